"""Finite-difference checks of backward (and of backward's own backward), in float64.

Rather than build whole Jacobians, each check contracts them with a random cotangent v: backward gives
v^T J in one pass, and central differences give the same vector one input element at a time.
"""

import numpy as np

from .engine import grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    pass


def _as_tuple(out):
    return (out,) if isinstance(out, Tensor) else tuple(out)


def _checked(inputs):
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor) and t.requires_grad and t.data.dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {i} is {t.data.dtype}; finite differences need float64 inputs "
                "(Tensor(..., dtype=np.float64))"
            )
    return [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Check fn's backward against central differences for every input that requires grad.

    fn(*inputs) returns a Tensor or a tuple of Tensors. Raises GradcheckError naming the input and the
    worst element on a mismatch; returns True otherwise.
    """
    inputs = tuple(inputs)
    checked = _checked(inputs)
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    rng = np.random.default_rng(seed)
    outs = _as_tuple(fn(*inputs))
    cotangents = [rng.standard_normal(o.data.shape) for o in outs]

    live = [(o, v) for o, v in zip(outs, cotangents) if o.requires_grad]
    if live:
        analytic = grad(
            [o for o, _ in live],
            [inputs[i] for i in checked],
            [v.astype(o.data.dtype) for o, v in live],
            allow_unused=True,
        )
    else:
        analytic = [None] * len(checked)

    def contracted():
        # not under no_grad: fn may itself differentiate (gradgradcheck's first-order gradients)
        return sum(float(np.sum(o.data * v)) for o, v in zip(_as_tuple(fn(*inputs)), cotangents))

    for i, a in zip(checked, analytic):
        x = inputs[i].data
        numeric = np.zeros(x.shape)
        for k in np.ndindex(x.shape):  # element by element in the input itself, whatever its strides
            orig = x[k]
            x[k] = orig + eps
            up = contracted()
            x[k] = orig - eps
            down = contracted()
            x[k] = orig
            numeric[k] = (up - down) / (2 * eps)
        got = np.zeros(x.shape) if a is None else a.data
        if got.shape != x.shape:
            raise GradcheckError(f"gradcheck: gradient of input {i} has shape {got.shape}, input has {x.shape}")
        if not np.allclose(got, numeric, atol=atol, rtol=rtol):
            err = np.abs(got - numeric)
            k = np.unravel_index(int(np.argmax(err)), x.shape) if x.shape else ()
            raise GradcheckError(
                f"gradcheck: input {i}: backward gives {got[k]:.6g} at {k}, finite differences "
                f"{numeric[k]:.6g} (max abs error {err.max():.3g})"
            )
    return True


def gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Check the gradients of fn's gradients (backward with create_graph=True) by finite differences."""
    inputs = tuple(inputs)
    checked = _checked(inputs)
    rng = np.random.default_rng(seed + 1)
    outs = _as_tuple(fn(*inputs))
    cotangents = [Tensor(rng.standard_normal(o.data.shape), dtype=o.data.dtype) for o in outs]

    def first_order(*xs):
        outs = _as_tuple(fn(*xs))
        gs = grad(list(outs), [xs[i] for i in checked], cotangents, create_graph=True, allow_unused=True)
        return tuple(g if g is not None else Tensor(np.zeros(xs[i].data.shape), dtype=np.float64)
                     for g, i in zip(gs, checked))

    return gradcheck(first_order, inputs, eps=eps, atol=atol, rtol=rtol, seed=seed + 2)
