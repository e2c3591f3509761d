"""Gradient utilities."""

import math
import numbers

import numpy as np

from ..autograd.tensor import Tensor


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, *, eps=1e-6):
    """Scale all gradients together so that their global norm (the norm_type-norm of all their values: 2,
    inf or any other p > 0, as in PyTorch) is at most max_norm; returns the norm before.

    A non-finite norm is returned as is and the gradients are left alone, so the caller can skip the step.
    """
    if (isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or not norm_type > 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be a number > 0 (2, inf, ...), got {norm_type!r} "
                         "(eps is given by name)")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad.data for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if norm_type == 2:  # (float16's squares overflow past 256: summed in float32)
        flat = [g.ravel().astype(np.float32) if g.dtype == np.float16 else g.ravel() for g in grads]
        total = math.sqrt(sum(float(np.dot(f, f)) for f in flat))
    elif norm_type == math.inf:  # (np.max, not max(): a NaN in any gradient makes the norm NaN)
        total = float(np.max([np.max(np.abs(g)) for g in grads if g.size], initial=0.0))
    else:
        p = float(norm_type)
        try:
            total = sum(float(np.sum(np.abs(g.astype(np.float64)) ** p)) for g in grads) ** (1 / p)
        except OverflowError:  # a tiny p: the root of a sum over 1 grows without bound
            total = math.inf
    if not math.isfinite(total):
        return total
    scale = max_norm / (total + eps)
    if scale < 1:
        for g in grads:
            g *= g.dtype.type(scale)
    return total
