"""The primitive ops and their derivatives, side by side.

Each op is a `Function` whose `forward` computes on ndarrays and whose `backward` is the VJP. Backward
formulas use only operators, methods that ndarrays and Tensors share (`sum`, `mean`, `reshape`,
`transpose`, `swapaxes`, `astype`, indexing) and the namespace `xp()`, so the same line runs on arrays in
a plain backward and on Tensors in a create_graph backward (which makes gradients of gradients free).
Broadcast reduction and dtype casting of the results are the engine's job, not the ops'.

Further down, composite ops (conv2d, pooling, gather, stack, embedding, dropout, ...) are built from these
primitives in a few lines each.
"""

import builtins
import math

import numpy as np
from scipy import special as _special

from .function import Function
from .grad_mode import state
from .random import default_rng
from .tensor import FLOAT_DTYPES, Tensor

_ndarray = np.ndarray


# ================================================================================================
# Elementwise
# ================================================================================================


class Add(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, g):
        return g, g


class Sub(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, g):
        return g, (-g if ctx.needs(1) else None)


class Neg(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class Mul(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, a, b):
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.inputs
        return (g * b if ctx.needs(0) else None), (g * a if ctx.needs(1) else None)


class Div(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, a, b):
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.inputs
        ga = g / b
        return (ga if ctx.needs(0) else None), (-ga * a / b if ctx.needs(1) else None)


class PowScalar(Function):
    """x ** p for a constant exponent p."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, p):
        ctx.saved = p
        return x**p

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        p = ctx.saved
        if p == 0:
            return (g * 0,)  # constant 1: zero slope, also at x = 0 (where p * x**(p-1) is 0 * inf)
        if p == 2:
            return (g * x * 2,)
        return (g * p * x ** (p - 1),)


class Pow(Function):
    """a ** b for tensors a and b."""

    __slots__ = ()
    save_inputs = True
    save_output = True

    @staticmethod
    def forward(ctx, a, b):
        return a**b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.inputs
        a_values, b_values = ctx.input_arrays  # the masks are constants in either mode
        np_ = xp()
        ga = gb = None
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 ** -1, log 0 and log of a negative: as torch
            if ctx.needs(0):  # where b == 0, a ** b is 1 for every a: 0, also at a == 0 (b * a**(b-1) is 0 * inf)
                ga = g * np_.where(b_values == 0, 0, b * a ** (b - 1))
            if ctx.needs(1):  # a**b log a: 0 where a == 0 and b >= 0 (the limit), nan for a < 0 (no real log)
                gb = g * np_.where((a_values == 0) & (b_values >= 0), 0, ctx.out * np_.log(a))
        return ga, gb


class Exp(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x):
        return np.exp(x)

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.out,)


class Log(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x):
        return np.log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        return (g / x,)


class Sqrt(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x):
        return np.sqrt(x)

    @staticmethod
    def backward(ctx, g):
        return (g / (ctx.out * 2),)


class Tanh(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x):
        return np.tanh(x)

    @staticmethod
    def backward(ctx, g):
        y = ctx.out
        return (g * (1 - y * y),)


class Sigmoid(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x):
        # exp of a non-positive number only: finite for any input, even +-1000
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))

    @staticmethod
    def backward(ctx, g):
        y = ctx.out
        return (g * y * (1 - y),)


class Relu(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x):
        return np.maximum(x, 0)

    @staticmethod
    def backward(ctx, g):
        return (g * (ctx.out > 0),)


class Erf(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x):
        return np.asarray(_special.erf(x), dtype=x.dtype)  # scipy's erf widens float16 to float64

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        return (g * xp().exp(-(x * x)) * _TWO_OVER_SQRT_PI,)


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)
_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


class Gelu(Function):
    """x * Phi(x), exactly (erf) or with the tanh approximation."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, approximate):
        # Phi(x) (or its tanh form h) is kept for backward; computed in place to spare passes over memory,
        # in float32 for float16 (whose x^3 overflows from |x| = 40 on)
        xc = x.astype(np.float32) if x.dtype == np.float16 else x
        if approximate == "tanh":  # h = (1 + tanh(c (x + a x^3))) / 2, c = sqrt(2 / pi), a = 0.044715
            phi = np.asarray(xc * xc)  # (an array even for a 0-d x: numpy gives a scalar, no out= target)
            phi *= _SQRT_2_OVER_PI * 0.044715
            phi += _SQRT_2_OVER_PI
            phi *= xc
            np.tanh(phi, out=phi)
            phi *= 0.5
            phi += 0.5
        else:  # (1 + erf(x / sqrt 2)) / 2 as erfc(-x / sqrt 2) / 2: no cancellation for negative x
            phi = np.asarray(_special.erfc(xc * -_INV_SQRT2) * 0.5)
        phi = phi.astype(x.dtype, copy=False)
        ctx.saved = (approximate, phi)
        return phi * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        approximate, phi = ctx.saved
        if not state.graph:
            slope = _gelu_slope(x, approximate, phi)
            if slope.shape == g.shape and slope.dtype == g.dtype:
                slope *= g  # a new array of ours: the gradient without another one
                return (slope,)
            return (g * slope,)
        if approximate == "tanh":
            t = tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            dt = (1 - t * t) * _SQRT_2_OVER_PI * (1 + 0.134145 * x * x)
            return (g * (0.5 * (1 + t) + 0.5 * x * dt),)
        pdf = exp(-0.5 * x * x) * _INV_SQRT_2PI
        return (g * (0.5 * (1 + erf(x * _INV_SQRT2)) + x * pdf),)


def _gelu_slope(x, approximate, phi):
    """d gelu / dx on arrays: the create_graph formulas above, rearranged to make few passes over memory."""
    if x.dtype == np.float16:  # x^2 overflows float16 from |x| = 256 on, and 0 * inf would make the slope NaN
        return _gelu_slope(x.astype(np.float32), approximate, phi.astype(np.float32)).astype(np.float16)
    if approximate == "tanh":
        # with t = 2h - 1: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3a x^2) = h + h (1 - h) x (2c + 6ac x^2)
        w = np.asarray(x * x)
        w *= 6 * _SQRT_2_OVER_PI * 0.044715
        w += 2 * _SQRT_2_OVER_PI
        w *= x
        slope = np.subtract(1, phi, dtype=phi.dtype)
        slope *= phi
        slope *= w
        slope += phi
        return slope
    slope = np.asarray(x * x)  # Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)
    slope *= -0.5
    np.exp(slope, out=slope)
    slope *= _INV_SQRT_2PI
    slope *= x
    slope += phi
    return slope


class Abs(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x):
        return np.abs(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        return (g * xp().sign(x),)


class Maximum(Function):
    """Elementwise max; at ties each side gets half the gradient (as in PyTorch)."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, a, b):
        return np.maximum(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.inputs
        X = xp()
        wa = X.cast(a > b, ctx.dtype) + X.cast(a == b, ctx.dtype) * 0.5
        return (g * wa if ctx.needs(0) else None), (g * (1 - wa) if ctx.needs(1) else None)


class Clip(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.saved = (lo, hi)
        return np.clip(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        x = ctx.input_arrays[0]  # the mask is a constant, in either mode
        lo, hi = ctx.saved
        inside = np.ones(x.shape, bool)
        if lo is not None:
            inside &= x >= lo
        if hi is not None:
            inside &= x <= hi
        return (g * inside,)


class Where(Function):
    """where(cond, a, b) with a constant boolean condition."""

    __slots__ = ()

    @staticmethod
    def forward(ctx, a, b, cond):
        ctx.saved = cond
        return np.where(cond, a, b)

    @staticmethod
    def backward(ctx, g):
        cond = ctx.saved
        X = xp()
        return (X.where(cond, g, 0) if ctx.needs(0) else None), (X.where(cond, 0, g) if ctx.needs(1) else None)


class Cast(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, x, dtype):
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return (g,)  # the engine casts the gradient back to the input's dtype


# ================================================================================================
# Reductions
# ================================================================================================


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim if ndim else 0)
    return tuple(out)


def _kept_shape(shape, axes):
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _sum_float16(a, axis=None, keepdims=False, out=None):
    """a.sum(axis) of a float16 array, accumulated in float32 (into `out` if given): a float16 running sum
    stalls (0.01 added 10000 times stops at 32)."""
    total = np.sum(a, axis=axis, keepdims=keepdims, dtype=np.float32, out=out)
    return total if out is not None else total.astype(np.float16)


class Sum(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.saved = (x.shape, _kept_shape(x.shape, axes))
        if x.dtype == np.float16:
            return _sum_float16(x, axes, keepdims)
        return x.sum(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, kept = ctx.saved
        return (xp().broadcast_to(g.reshape(kept), shape),)


class Mean(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.saved = (x.shape, _kept_shape(x.shape, axes))
        return x.mean(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, kept = ctx.saved
        count = math.prod(shape) // builtins.max(math.prod(kept), 1) if shape else 1
        X = xp()
        if ctx.dtype == np.float16:  # a count past 65504 is inf in float16 (g / inf = 0): divided in float32
            return (X.broadcast_to(X.cast(X.cast(g.reshape(kept), np.float32) / count, np.float16), shape),)
        return (X.broadcast_to(g.reshape(kept) / count, shape),)


class Max(Function):
    """max (or min) over axes; tied maxima share the gradient equally."""

    __slots__ = ()
    save_inputs = True
    save_output = True

    @staticmethod
    def forward(ctx, x, axes, keepdims, minimum):
        ctx.saved = _kept_shape(x.shape, axes), axes
        return x.min(axis=axes, keepdims=keepdims) if minimum else x.max(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        kept, axes = ctx.saved
        X = xp()
        hit = X.cast(x == ctx.out.reshape(kept), ctx.dtype)
        return (hit * (g.reshape(kept) / hit.sum(axis=axes, keepdims=True)),)


class Var(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, axes, keepdims, correction):
        n = math.prod(x.shape[a] for a in axes)
        if n - correction <= 0:
            raise ValueError(f"var: {n} elements are too few for correction={correction}")
        ctx.saved = (_kept_shape(x.shape, axes), axes, n - correction)
        if x.dtype == np.float16:  # numpy sums float16's squares in float16, where they overflow past 65504
            return x.astype(np.float32).var(axis=axes, keepdims=keepdims, ddof=correction).astype(np.float16)
        return x.var(axis=axes, keepdims=keepdims, ddof=correction)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.inputs
        kept, axes, dof = ctx.saved
        X = xp()
        half = ctx.dtype == np.float16
        if half:  # g times x's spread can overflow float16 where the gradient does not: computed in float32
            x, g = X.cast(x, np.float32), X.cast(g, np.float32)
        centered = x - x.mean(axis=axes, keepdims=True)
        gx = g.reshape(kept) * centered * (2 / dof)
        return (X.cast(gx, np.float16) if half else gx,)


# ================================================================================================
# Shapes, indexing, joining
# ================================================================================================


class Reshape(Function):
    __slots__ = ()
    output_views_input = True

    @staticmethod
    def forward(ctx, x, shape):
        ctx.saved = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return (g.reshape(ctx.saved),)


class Transpose(Function):
    __slots__ = ()
    output_views_input = True

    @staticmethod
    def forward(ctx, x, axes):
        ctx.saved = tuple(np.argsort(axes))
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        return (g.transpose(ctx.saved),)


class BroadcastTo(Function):
    __slots__ = ()
    output_views_input = True

    @staticmethod
    def forward(ctx, x, shape):
        return np.broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, g):
        return (g,)  # the engine sums it back to the input's shape


class GetItem(Function):
    """x[index]: basic slicing and integer-array (advanced) indexing."""

    __slots__ = ()
    output_views_input = True

    @staticmethod
    def forward(ctx, x, index):
        # index arrays are kept as copies: a later in-place change to them must not move the gradient
        parts = [p.copy() if isinstance(p, _ndarray) else p for p in (index if isinstance(index, tuple) else (index,))]
        ctx.saved = (x.shape, tuple(parts) if isinstance(index, tuple) else parts[0])
        return x[index]

    @staticmethod
    def backward(ctx, g):
        shape, index = ctx.saved
        return (xp().index_add(shape, index, g),)


class IndexAdd(Function):
    """zeros(shape) with g added at index (repeated indices accumulate): the adjoint of x[index]."""

    __slots__ = ()

    @staticmethod
    def forward(ctx, g, shape, index):
        ctx.saved = index
        return _index_add_array(shape, index, g)

    @staticmethod
    def backward(ctx, gg):
        return (gg[ctx.saved],)


def _index_add_array(shape, index, g):
    if isinstance(index, _ndarray) and index.dtype.kind in "iu" and index.size:
        return _add_rows(shape, index, g)
    out = np.zeros(shape, g.dtype)
    if _is_basic_index(index):
        out[index] = g  # a basic index names each element at most once
    else:
        np.add.at(out, index, g)
    return out


def _add_rows(shape, index, g):
    """zeros(shape) with g's rows added at rows `index` (an integer array on axis 0: an embedding's lookup):
    sorted so that each row's share is one reduceat, several times faster than np.add.at (the sums round
    differently, by an ulp or so)."""
    rows = index.reshape(-1)
    if rows.min() < 0:
        rows = rows.astype(np.intp)  # an int8 index of a 200-row table: 200 does not fit its dtype
        rows = np.where(rows < 0, rows + shape[0], rows)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
    out = np.zeros(shape, g.dtype)
    out.reshape(shape[0], -1)[rows[starts]] = np.add.reduceat(g.reshape(rows.size, -1)[order], starts, axis=0)
    return out


class Concat(Function):
    __slots__ = ()

    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.saved = (axis, np.cumsum([a.shape[axis] for a in arrays])[:-1].tolist(), arrays[0].ndim)
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, g):
        axis, cuts, ndim = ctx.saved
        edges = [0] + cuts + [g.shape[axis]]
        lead = (slice(None),) * (axis % ndim)
        return tuple(
            g[lead + (slice(lo, hi),)] if ctx.needs(i) else None
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))
        )


class Pad(Function):
    """Constant padding; pad_width as in numpy: one (before, after) pair per axis."""

    __slots__ = ()

    @staticmethod
    def forward(ctx, x, pad_width, value):
        ctx.saved = tuple(slice(lo, lo + n) for (lo, _), n in zip(pad_width, x.shape))
        return np.pad(x, pad_width, constant_values=value)

    @staticmethod
    def backward(ctx, g):
        return (g[ctx.saved],)


# ================================================================================================
# Linear algebra
# ================================================================================================


class MatMul(Function):
    """a @ b for a, b of two or more dimensions (batch dimensions broadcast)."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim > 2 and b.ndim == 2:  # x @ w over a batch: one matrix product (see Linear)
            return (_rows_of(a) @ b).reshape(*a.shape[:-1], b.shape[1])
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.inputs
        ga = gb = None
        if a.ndim > 2 and b.ndim == 2 and not state.graph:
            # folded as in forward: b's gradient comes out summed over the batch, not as one product per
            # batch index that is then summed away
            g2 = _rows_of(g)
            if ctx.needs(0):
                ga = (g2 @ b.T).reshape(a.shape)
            if ctx.needs(1):
                out = ctx.grad_out(1)
                gb = _rows_of(a).T @ g2 if out is None else np.matmul(_rows_of(a).T, g2, out=out)
            return ga, gb
        if ctx.needs(0):
            out = ctx.grad_out(0) if a.ndim == b.ndim == 2 else None  # no batch dims to sum away
            ga = g @ b.swapaxes(-1, -2) if out is None else np.matmul(g, b.T, out=out)
        if ctx.needs(1):
            out = ctx.grad_out(1) if a.ndim == b.ndim == 2 else None
            gb = a.swapaxes(-1, -2) @ g if out is None else np.matmul(a.T, g, out=out)
        return ga, gb


class Linear(Function):
    """x @ w.T + b, with x (..., in), w (out, in), b (out,): one node, no broadcast temporary."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, w, b=None):
        # batch dimensions folded into one matrix product: numpy would make one BLAS call per leading index
        out = x @ w.T if x.ndim <= 2 else (_rows_of(x) @ w.T).reshape(*x.shape[:-1], w.shape[0])
        if b is not None:
            out += b
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.inputs[:2]
        g2 = _rows_of(g) if g.ndim != 2 else g
        gx = None
        if ctx.needs(0):
            gx = g @ w if g.ndim <= 2 or state.graph else (g2 @ w).reshape(x.shape)
        gw = gb = None
        if ctx.needs(1) or len(ctx.parents) == 3 and ctx.needs(2):
            if ctx.needs(1):
                x2 = _rows_of(x) if x.ndim != 2 else x
                out = ctx.grad_out(1)  # a destination is only offered in plain (numpy) backward
                gw = g2.T @ x2 if out is None else np.matmul(g2.T, x2, out=out)
            if len(ctx.parents) == 3 and ctx.needs(2):
                out = ctx.grad_out(2)
                if g2.dtype == np.float16 and not state.graph:  # (under create_graph, g2.sum is Sum's)
                    gb = _sum_float16(g2, 0, out=out)
                else:
                    gb = g2.sum(axis=0) if out is None else np.sum(g2, axis=0, out=out)
        return (gx, gw) if len(ctx.parents) == 2 else (gx, gw, gb)


# ================================================================================================
# Losses and normalisation (fused for stability and speed)
# ================================================================================================


def _rows_of(a, trailing=1):
    """a as a matrix: one row per index of its leading axes, its `trailing` last axes flattened in each.
    (reshape(-1, n) cannot tell the row count when n is 0.)"""
    lead = a.shape[:a.ndim - trailing]
    return a.reshape(math.prod(lead), math.prod(a.shape[a.ndim - trailing:]))


def _softmax_array(x, axis, scale=None, hidden=None):
    """softmax(x * scale) over axis, with the entries where `hidden` is True weighted 0; one new array,
    every pass after the first in place."""
    z = x * scale if scale is not None else x.copy()
    if z.size == 0:  # an empty axis has no maximum to subtract; the result is empty too (as in PyTorch)
        return z
    if hidden is not None:
        np.copyto(z, -np.inf, where=hidden)
    # (x * scale keeps a transposed x's layout; float16's exps turn subnormal far above _UNSHIFTED_MIN_SUM)
    if axis in (-1, z.ndim - 1) and z.flags.c_contiguous and z.dtype in (np.float32, np.float64):
        return _softmax_rows(z, x, scale, hidden)
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= _sum_keepdims(z, axis)
    return z


# A row whose exp sum lies in [_UNSHIFTED_MIN_SUM, float max] is normalized without subtracting its maximum:
# its largest exp is then far above float32's smallest normal, and an entry lost to underflow weighs under
# 2**-106 (float32; float64 has room to spare). numpy takes a maximum, and subtracts it, one short row at a
# time: most of a 64-wide softmax's cost.
_UNSHIFTED_MIN_SUM = 2.0 ** -20


def _softmax_rows(z, x, scale, hidden):
    """softmax over the last axis of z (x * scale, hidden entries -inf; a new C-contiguous array), in place.
    Each row is exp'd as it is, and only the rows whose sum overflowed or came out too small (or NaN) are
    redone from x with their maximum subtracted: a row's result depends on that row alone."""
    n = z.shape[-1]
    rows = z.reshape(-1, n)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # rows that overflow are redone below
        np.exp(rows, out=rows)
        sums = _sum_keepdims(rows, 1)
        fine = (sums >= _UNSHIFTED_MIN_SUM) & (sums <= np.finfo(rows.dtype).max)
        rows /= sums
    if not fine.all():
        redo = np.flatnonzero(~fine[:, 0])
        again = x.reshape(-1, n)[redo]
        if scale is not None:
            again *= scale
        if hidden is not None:
            np.copyto(again, -np.inf, where=np.broadcast_to(hidden, x.shape).reshape(-1, n)[redo])
        again -= again.max(axis=-1, keepdims=True)
        np.exp(again, out=again)
        again /= again.sum(axis=-1, keepdims=True)
        rows[redo] = again
    return z


def _sum_keepdims(a, axis):
    """a.sum(axis, keepdims=True); over the last axis of a C-contiguous array, as one matrix-vector product
    (numpy sums short rows one at a time: a 64-wide row cost it as much as its exp). A row's sum depends on
    its values and its place in the array (BLAS's blocking), not on the other rows: a causal model's earlier
    outputs stay bitwise the same whatever follows them, but a sample alone and in a batch may differ by
    an ulp."""
    if a.ndim >= 2 and a.size and axis in (-1, a.ndim - 1) and a.flags.c_contiguous:
        n = a.shape[-1]
        return (a.reshape(-1, n) @ np.ones(n, a.dtype)).reshape(a.shape[:-1] + (1,))
    return a.sum(axis=axis, keepdims=True)


def _log_softmax_array(x, axis):
    if x.size == 0:
        return x.copy()
    z = x - x.max(axis=axis, keepdims=True)
    z -= np.log(_sum_keepdims(np.exp(z), axis))
    return z


class Softmax(Function):
    """softmax(x * scale) over axis, entries where `hidden` is True left out: one node for attention's
    scale, causal mask and softmax (three full-size temporaries and six passes fewer)."""

    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x, axis, scale=None, hidden=None):
        ctx.saved = (axis, scale, hidden)
        return _softmax_array(x, axis, scale, hidden)

    @staticmethod
    def backward(ctx, g):
        p = ctx.out
        axis, scale, hidden = ctx.saved
        if state.graph:
            gx = p * (g - (g * p).sum(axis=axis, keepdims=True))
            gx = gx * scale if scale is not None else gx
            return (gx if hidden is None else where(~hidden, gx, 0),)
        gx = g * p
        np.subtract(g, _sum_keepdims(gx, axis), out=gx)
        gx *= p
        if scale is not None:
            gx *= scale
        if hidden is not None:  # 0 exactly, as through where: p is 0 there, but 0 * NaN is not (a row with
            np.copyto(gx, 0, where=hidden)  # nothing left unmasked, or an inf in it)
        return (gx,)


class LogSoftmax(Function):
    __slots__ = ()
    save_output = True

    @staticmethod
    def forward(ctx, x, axis):
        ctx.saved = axis
        return _log_softmax_array(x, axis)

    @staticmethod
    def backward(ctx, g):
        return (g - xp().exp(ctx.out) * g.sum(axis=ctx.saved, keepdims=True),)


class CrossEntropy(Function):
    """Cross-entropy of logits (..., C) against integer classes (...), from a stable log-softmax.

    Backward is fused: (softmax - onehot) * weight, never through log(softmax).
    """

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, logits, target, reduction, ignore_index):
        if logits.dtype == np.float16:  # a row's exp sum, the sum of the losses and the count overflow float16
            loss = CrossEntropy.forward(ctx, logits.astype(np.float32), target, reduction, ignore_index)
            return loss.astype(np.float16)  # (e and s stay float32 for backward)
        classes = logits.shape[-1]
        flat = logits if logits.ndim == 2 else logits.reshape(-1, classes)
        t = (target if target.ndim == 1 else target.reshape(-1)).copy()  # backward must see these targets
        n = t.shape[0]
        valid = None  # None: every target counts
        if n:
            lo, hi = t.min(), t.max()
            if lo <= ignore_index <= hi:
                valid = t != ignore_index
                t = np.where(valid, t, 0)
                lo, hi = t.min(), t.max()
            if lo < 0 or hi >= classes:
                raise IndexError(
                    f"cross_entropy: target class {lo if lo < 0 else hi} is out of range for {classes} classes"
                )
        z = flat - flat.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = _sum_keepdims(e, 1)
        rows = _rows(n)
        losses = np.log(s[:, 0]) - z[rows, t]
        count = n
        if valid is not None:
            losses *= valid
            count = int(valid.sum())
        ctx.saved = (e, s, t, valid, reduction, count, logits.shape)
        if reduction == "none":
            return losses.reshape(target.shape)
        total = losses.sum()
        return total if reduction == "sum" else total / builtins.max(count, 1)

    @staticmethod
    def backward(ctx, g):
        e, s, t, valid, reduction, count, shape = ctx.saved
        rows = _rows(t.shape[0])
        half = ctx.dtype == np.float16 and not state.graph
        if half:  # with forward's float32 e and s: in float32 (1 / count is subnormal in float16 from 16384 on)
            g = g.astype(np.float32)
        if state.graph:  # softmax as a differentiable function of the logits
            onehot = np.zeros(e.shape, e.dtype)
            onehot[rows, t] = 1
            diff = softmax(ctx.inputs[0].reshape(-1, shape[-1]), -1) - onehot
        else:
            diff = e / s  # a fresh array: the saved values stay intact for a retained graph
            diff[rows, t] -= 1
        if reduction == "none":
            weight = g.reshape(-1, 1)
        else:
            weight = g * (1 if reduction == "sum" else 1 / builtins.max(count, 1))
        if valid is not None:
            weight = weight * valid[:, None]
        if state.graph:
            diff = diff * weight
        else:
            diff *= weight
        return (diff.reshape(shape).astype(np.float16) if half else diff.reshape(shape),)


_rows_cache = [np.arange(0)]


def _rows(n):
    """np.arange(n), kept: every cross-entropy step of a run asks for the same one."""
    rows = _rows_cache[0]
    if rows.shape[0] != n:
        rows = _rows_cache[0] = np.arange(n)
    return rows


class MSE(Function):
    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, x, y, reduction):
        d = x - y
        ctx.saved = reduction
        sq = d * d
        if reduction == "none":
            return sq
        return sq.sum() if reduction == "sum" else sq.mean()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.inputs
        reduction = ctx.saved
        d = x - y
        scale = 2 if reduction != "mean" else 2 / d.size
        gx = d * (g * scale)
        return (gx if ctx.needs(0) else None), (-gx if ctx.needs(1) else None)


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing axes that weight covers."""

    __slots__ = ()
    save_inputs = True

    # Plain mode works on rows (one per normalized slice) and sums them by matrix-vector products: numpy
    # reduces short rows one at a time, at several times the cost of a pass over them.

    @staticmethod
    def forward(ctx, x, w=None, b=None, *, axes, eps):
        if x.dtype == np.float16:  # a row's sum of squares overflows float16: xhat and rstd are kept in float32
            w, b = (None if p is None else p.astype(np.float32) for p in (w, b))
            return LayerNorm.forward(ctx, x.astype(np.float32), w, b, axes=axes, eps=eps).astype(np.float16)
        n = math.prod(x.shape[x.ndim - len(axes):])
        if n == 0:  # nothing to normalize: an empty result, as in PyTorch
            ctx.saved = (None, None, axes, eps)
            return np.empty(x.shape, x.dtype)
        rows = _rows_of(x, len(axes))  # a view when x is C-contiguous
        ones = np.ones(n, x.dtype)
        inv_n = x.dtype.type(1 / n)
        xhat = rows - (rows @ ones * inv_n)[:, None]  # x - mean, then scaled in place: kept for backward
        out = xhat * xhat
        rstd = 1 / np.sqrt((out @ ones) * inv_n + eps)
        xhat *= rstd[:, None]
        ctx.saved = (xhat, rstd, axes, eps)
        if w is not None:
            np.multiply(xhat, w.reshape(-1), out=out)
        else:
            np.copyto(out, xhat)
        if b is not None:
            out += b.reshape(-1)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, axes, eps = ctx.saved
        inputs = ctx.inputs
        x = inputs[0]
        w = inputs[1] if len(inputs) > 1 else None
        if state.graph:  # recompute the statistics as differentiable functions of x
            if x.dtype == np.float16:  # in float32, as forward does
                x, w, g = (None if t is None else cast(t, np.float32) for t in (x, w, g))
                grads = LayerNorm._graph_backward(ctx, g, x, w, axes, eps)
                return tuple(None if t is None else cast(t, np.float16) for t in grads)
            return LayerNorm._graph_backward(ctx, g, x, w, axes, eps)
        if xhat is None:  # an empty normalized shape: every gradient is empty
            return tuple(np.zeros(t.shape, t.dtype) if ctx.needs(i) else None for i, t in enumerate(inputs))
        if x.dtype == np.float16:  # xhat and rstd are float32 (see forward), and so is the arithmetic with them
            w = None if w is None else w.astype(np.float32)
            grads = LayerNorm._rows_backward(ctx, g.astype(np.float32), xhat, rstd, w, axes, x.shape)
            return tuple(None if t is None else t.astype(np.float16) for t in grads)
        return LayerNorm._rows_backward(ctx, g, xhat, rstd, w, axes, x.shape)

    @staticmethod
    def _rows_backward(ctx, g, xhat, rstd, w, axes, shape):
        inputs = ctx.inputs
        n = xhat.shape[1]
        g2 = _rows_of(g, len(axes))
        ones_m = np.ones(g2.shape[0], g2.dtype)
        gx = gw = gb = None
        if len(inputs) > 2 and ctx.needs(2):
            gb = (ones_m @ g2).reshape(w.shape)
        if not ctx.needs(0) and not (w is not None and ctx.needs(1)):
            return (gx, gw, gb)[: len(inputs)]
        dxhat_xhat = g2 * xhat  # g * xhat: the weight's gradient summed over rows, then (times w) dxhat * xhat
        if w is not None and ctx.needs(1):
            gw = (ones_m @ dxhat_xhat).reshape(w.shape)
        if ctx.needs(0):
            # gx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), row by row
            ones_n, inv_n = np.ones(n, g2.dtype), g2.dtype.type(1 / n)
            dxhat = g2 * w.reshape(-1) if w is not None else g2.copy()
            if w is not None:
                dxhat_xhat *= w.reshape(-1)
            mean_dxhat_xhat = (dxhat_xhat @ ones_n) * inv_n
            mean_dxhat = (dxhat @ ones_n) * inv_n
            np.multiply(xhat, mean_dxhat_xhat[:, None], out=dxhat_xhat)
            dxhat -= dxhat_xhat
            dxhat -= mean_dxhat[:, None]
            dxhat *= rstd[:, None]
            gx = dxhat.reshape(shape)
        return (gx, gw, gb)[: len(inputs)]

    @staticmethod
    def _graph_backward(ctx, g, x, w, axes, eps):
        if not math.prod(x.shape[x.ndim - len(axes):]):  # an empty normalized shape: every gradient is empty
            lead = tuple(range(x.ndim - len(axes)))
            return (g if ctx.needs(0) else None, *(g.sum(axis=lead) if ctx.needs(i) else None
                                                    for i in range(1, len(ctx.inputs))))
        xc = x - x.mean(axis=axes, keepdims=True)
        rstd = 1 / ((xc * xc).mean(axis=axes, keepdims=True) + eps).sqrt()
        xhat = xc * rstd
        gx = gw = gb = None
        if ctx.needs(0):
            dxhat = g * w if w is not None else g
            gx = rstd * (
                dxhat
                - dxhat.mean(axis=axes, keepdims=True)
                - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
            )
        if len(ctx.inputs) > 1 and ctx.needs(1):
            gw = g * xhat
        if len(ctx.inputs) > 2 and ctx.needs(2):
            gb = g
        return (gx, gw, gb)[: len(ctx.inputs)]


# ================================================================================================
# Windows: the one primitive behind convolution and pooling
# ================================================================================================


def _unfold_array(x, kernel, stride, padding, pad_value=0.0):
    n, c, h, w = x.shape
    kh, kw = kernel
    if padding[0] or padding[1]:
        x = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=pad_value)
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    windows = windows[:, :, :: stride[0], :: stride[1]]  # (n, c, oh, ow, kh, kw)
    oh, ow = windows.shape[2], windows.shape[3]
    cols = np.ascontiguousarray(windows.transpose(0, 1, 4, 5, 2, 3))
    return cols.reshape(n, c * kh * kw, oh * ow)


def _fold_array(cols, shape, kernel, stride, padding):
    n, c, h, w = shape
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    cols = cols.reshape(n, c, kh, kw, oh, ow)
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw] += cols[:, :, i, j]
    return out[:, :, ph : ph + h, pw : pw + w]


class Unfold(Function):
    """Image (N, C, H, W) to columns (N, C*kh*kw, OH*OW): every kernel window as a column."""

    __slots__ = ()
    output_views_input = True  # a 1x1 kernel, or one window over the whole image: the columns are x itself

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, pad_value):
        ctx.saved = (x.shape, kernel, stride, padding)
        return _unfold_array(x, kernel, stride, padding, pad_value)

    @staticmethod
    def backward(ctx, g):
        return (xp().fold(g, *ctx.saved),)


class Fold(Function):
    """Columns back to an image, summing where windows overlap: the adjoint of Unfold."""

    __slots__ = ()

    @staticmethod
    def forward(ctx, cols, shape, kernel, stride, padding):
        ctx.saved = (kernel, stride, padding)
        return _fold_array(cols, shape, kernel, stride, padding)

    @staticmethod
    def backward(ctx, g):
        kernel, stride, padding = ctx.saved
        return (xp().unfold(g, kernel, stride, padding),)


class ConvCols(Function):
    """conv2d's contraction: weight (O, C, kh, kw) times unfolded columns (N, C*kh*kw, L), plus bias (O,).

    The result is (N, O, L). Weight and bias are inputs of this one node, with no reshape between them and
    it, so their gradients can be written straight into gradient destinations (`ctx.grad_out`).
    """

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, cols, w, b=None):
        out = w.reshape(w.shape[0], -1) @ cols
        if b is not None:
            out += b[:, None]
        return out

    @staticmethod
    def backward(ctx, g):
        cols, w = ctx.inputs[:2]
        has_bias = len(ctx.parents) == 3
        gcols = gw = gb = None
        if ctx.needs(0):
            gcols = w.reshape(w.shape[0], -1).swapaxes(-1, -2) @ g
        if ctx.needs(1):
            if state.graph:
                gw = (g @ cols.swapaxes(-1, -2)).sum(axis=0).reshape(w.shape)
            else:  # a destination is only offered in plain (numpy) backward
                gw = _conv_weight_grad(g, cols, w, ctx.grad_out(1))
        if has_bias and ctx.needs(2):
            out = None if state.graph else ctx.grad_out(2)
            if g.dtype == np.float16 and not state.graph:
                gb = _sum_float16(g, (0, 2), out=out)
            else:
                gb = g.sum(axis=(0, 2)) if out is None else np.sum(g, axis=(0, 2), out=out)
        return (gcols, gw, gb) if has_bias else (gcols, gw)


_CONV_SCRATCH_BYTES = 1 << 20  # bound on the per-image products _conv_weight_grad keeps at once


def _conv_weight_grad(g, cols, w, out=None):
    """sum over n of g[n] @ cols[n].T, in the weight's shape: into `out` (a destination) or a new array.

    The per-image products are added up in batch order, the very sums `(g @ cols.swapaxes(-1, -2)).sum(0)`
    does, bit for bit, without its (N, O, C*kh*kw) stack: the first product is written by BLAS straight into
    the (O, C*kh*kw) view of the result, later ones go through a scratch of at most _CONV_SCRATCH_BYTES (a
    few images per batched matmul, so small products do not pay a Python step each) or, for a weight too
    large for two in that bound, one product's worth, added in place.
    """
    if out is None or not out.flags.c_contiguous:  # a destination is C-contiguous (set_grad_destination)
        out = np.empty(w.shape, g.dtype)
    o2 = out.reshape(w.shape[0], -1)  # so this is a view of it
    n = g.shape[0]
    if n == 0:
        o2[...] = 0
        return out
    np.matmul(g[0], cols[0].T, out=o2)
    if n == 1:
        return out
    per = builtins.max(1, builtins.min(n - 1, _CONV_SCRATCH_BYTES // builtins.max(o2.nbytes, 1) - 1))
    if per == 1:
        scratch = np.empty_like(o2)
        for i in range(1, n):
            np.matmul(g[i], cols[i].T, out=scratch)
            o2 += scratch
        return out
    stack = np.empty((per + 1,) + o2.shape, o2.dtype)  # stack[0]: the sum so far, then the next products
    for i in range(1, n, per):
        j = builtins.min(n, i + per)
        stack[0] = o2
        np.matmul(g[i:j], cols[i:j].swapaxes(-1, -2), out=stack[1 : 1 + j - i])
        np.sum(stack[: 1 + j - i], axis=0, out=o2)  # in order: stack[0] + stack[1] + ...
    return out


class MaxPoolTiles(Function):
    """Max pooling over non-overlapping kh x kw windows that tile the image exactly.

    The gradient goes to the first maximum (or NaN) of each window in row-major order, as in PyTorch. (The
    general case, overlapping or padded windows, is composed from unfold and max.)
    """

    __slots__ = ()
    save_inputs = True
    save_output = True

    @staticmethod
    def forward(ctx, x, kernel):
        kh, kw = kernel
        ctx.saved = kernel
        out = x[:, :, ::kh, ::kw].copy()
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    np.maximum(out, x[:, :, i::kh, j::kw], out=out)
        return out

    @staticmethod
    def backward(ctx, g):
        kh, kw = ctx.saved
        x, out = ctx.input_arrays[0], ctx.out_array  # the winner mask is a constant in either mode
        n, c, oh, ow = out.shape
        plain = isinstance(g, np.ndarray)  # else create_graph: the gradient is a Tensor expression of g
        # one window position at a time, over arrays of the output's size, each element written once: the
        # gradient itself (g where that position holds the window's first maximum, else 0), or in
        # create_graph the winner mask that g is multiplied by
        result = np.empty(x.shape, x.dtype)
        free = np.ones(out.shape, bool)  # windows whose maximum is still to be found
        hit = np.empty(out.shape, bool)
        for i in range(kh):
            for j in range(kw):
                np.equal(x[:, :, i::kh, j::kw], out, out=hit)
                hit &= free
                if plain:
                    np.multiply(g, hit, out=result[:, :, i::kh, j::kw])
                else:
                    result[:, :, i::kh, j::kw] = hit
                free ^= hit  # hit is within free: this clears it
        # windows whose maximum is NaN (never == itself): their first NaN gets the gradient, as on the unfold
        # path (argmax); PyTorch agrees for one NaN per window, and picks the last of several
        if free.any():
            for i in range(kh):
                for j in range(kw):
                    np.isnan(x[:, :, i::kh, j::kw], out=hit)
                    hit &= free
                    np.copyto(result[:, :, i::kh, j::kw], g if plain else 1, where=hit)
                    free ^= hit
        if plain:
            return (result,)
        spread = xp().broadcast_to(g.reshape(n, c, oh, 1, ow, 1), (n, c, oh, kh, ow, kw)).reshape(x.shape)
        return (spread * result,)


class MaxOverWindow(Function):
    """Maximum over axis 2 of unfolded windows (n, c, k, oh, ow); the first maximum gets the gradient."""

    __slots__ = ()
    save_inputs = True

    @staticmethod
    def forward(ctx, cols, inside=None):
        ctx.saved = inside  # (1, 1, k, oh, ow): the cells that are not padding, when there is padding
        return cols.max(axis=2)

    @staticmethod
    def backward(ctx, g):
        cols = ctx.input_arrays[0]  # the winner mask is a constant in either mode
        first = cols.argmax(axis=2)[:, :, None]
        inside = ctx.saved
        if inside is not None:
            # a window whose maximum is -inf ties with its padding: the first cell of the image gets the
            # gradient, as in PyTorch (the first cell may be padding, and the gradient was lost)
            padded = ~np.take_along_axis(np.broadcast_to(inside, cols.shape), first, axis=2)
            if padded.any():
                ties = (cols == cols.max(axis=2, keepdims=True)) & inside
                first = np.where(padded, ties.argmax(axis=2)[:, :, None], first)
        winner = np.zeros(cols.shape, cols.dtype)
        np.put_along_axis(winner, first, 1, axis=2)
        n, c, _, oh, ow = cols.shape
        return (g.reshape(n, c, 1, oh, ow) * winner,)


# ================================================================================================
# The two namespaces that backward formulas call through xp()
# ================================================================================================


class _ArrayNamespace:
    """Backward on ndarrays (the plain, fast path)."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    tanh = staticmethod(np.tanh)
    erf = staticmethod(_special.erf)
    sign = staticmethod(np.sign)
    where = staticmethod(np.where)
    broadcast_to = staticmethod(np.broadcast_to)
    index_add = staticmethod(_index_add_array)

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype)

    @staticmethod
    def fold(cols, shape, kernel, stride, padding):
        return _fold_array(cols, shape, kernel, stride, padding)

    @staticmethod
    def unfold(x, kernel, stride, padding):
        return _unfold_array(x, kernel, stride, padding)


class _TensorNamespace:
    """Backward on Tensors, recording a graph (create_graph=True)."""

    @staticmethod
    def exp(x):
        return exp(x)

    @staticmethod
    def log(x):
        return log(x)

    @staticmethod
    def tanh(x):
        return tanh(x)

    @staticmethod
    def erf(x):
        return erf(x)

    @staticmethod
    def sign(x):
        return Tensor._from_op(np.sign(x.data), None)

    @staticmethod
    def where(cond, a, b):
        return where(cond, a, b)

    @staticmethod
    def broadcast_to(x, shape):
        return broadcast_to(x, shape)

    @staticmethod
    def index_add(shape, index, g):
        return IndexAdd.apply(g, shape=shape, index=index)

    @staticmethod
    def cast(x, dtype):
        return cast(x, dtype)

    @staticmethod
    def fold(cols, shape, kernel, stride, padding):
        return Fold.apply(cols, shape=shape, kernel=kernel, stride=stride, padding=padding)

    @staticmethod
    def unfold(x, kernel, stride, padding):
        return Unfold.apply(x, kernel=kernel, stride=stride, padding=padding, pad_value=0.0)


_ARRAYS = _ArrayNamespace()
_TENSORS = _TensorNamespace()


def xp():
    """The namespace for backward formulas: numpy in a plain backward, Tensor ops under create_graph."""
    return _TENSORS if state.graph else _ARRAYS


# ================================================================================================
# The user-facing functions: argument checking, then one primitive or a few
# ================================================================================================


def _const(x, dtype):
    arr = x if isinstance(x, _ndarray) else np.asarray(x)
    if arr.dtype != dtype:
        if arr.dtype.kind not in "fiub":  # complex: the cast below would drop its imaginary part silently
            raise TypeError(f"a constant of dtype {arr.dtype} cannot meet a tensor (tensors hold real numbers, "
                            "integers or booleans)")
        if dtype.kind == "f" or arr.dtype.kind == "f":
            if arr.dtype.kind == "f" and dtype.kind != "f":
                dtype = np.dtype(np.float32)
            arr = arr.astype(dtype)
    return Tensor._from_op(arr, None)


def _pair(a, b, name):
    """Both operands as Tensors of one dtype; constants take the tensor's dtype."""
    ta = isinstance(a, Tensor)
    tb = isinstance(b, Tensor)
    if ta and tb:
        da = a.data.dtype
        db = b.data.dtype
        if da is not db and da != db:
            fa = da.kind == "f"
            fb = db.kind == "f"
            if fa and fb:
                raise TypeError(
                    f"{name}: dtypes {da} and {db} differ; cast one with .float() or .double() first"
                )
            if fa:
                b = _const(b.data, da)
            elif fb:
                a = _const(a.data, db)
        return a, b
    elif ta:
        b = _const(b, a.data.dtype)
    elif tb:
        a = _const(a, b.data.dtype)
    else:
        return Tensor(a), Tensor(b)
    # an integer or boolean tensor with a float constant: both float, as numpy would make float64
    if a.data.dtype.kind != "f" and b.data.dtype.kind == "f":
        a = _const(a.data, b.data.dtype)
    elif b.data.dtype.kind != "f" and a.data.dtype.kind == "f":
        b = _const(b.data, a.data.dtype)
    return a, b


def _tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _weight(w, x):
    """A weight or bias for input x: a Tensor as it is, an array a constant of x's dtype (as _pair makes them)."""
    return w if w is None or isinstance(w, Tensor) else _const(w, x.data.dtype)


def _floating(x):
    """x as a Tensor for an op whose result is floating point: integer and boolean data become float32
    (numpy would compute in float64). They never require grad, so the cast needs no graph."""
    x = _tensor(x)
    if x.data.dtype.kind != "f":
        return Tensor._from_op(x.data.astype(np.float32), None)
    return x


def _floating_for(x, *constants):
    """x as float32 if it is integer or boolean and one of the constants (Python numbers) is a float: as
    i + 0.5 is float32 (numpy would make float64, or cast the float to x's integers)."""
    if x.data.dtype.kind != "f" and any(isinstance(c, float) for c in constants):
        return _floating(x)
    return x


def _broadcast_error(name, a, b):
    return ValueError(f"{name}: shapes {a.data.shape} and {b.data.shape} do not broadcast together")


def _binary(op, name, a, b):
    a, b = _pair(a, b, name)
    try:
        return op.apply(a, b)
    except ValueError as e:
        if "broadcast" in str(e):
            raise _broadcast_error(name, a, b) from None
        raise


def add(a, b):
    return _binary(Add, "add", a, b)


def sub(a, b):
    return _binary(Sub, "sub", a, b)


def mul(a, b):
    return _binary(Mul, "mul", a, b)


def div(a, b):
    a, b = _pair(a, b, "div")
    if a.data.dtype.kind != "f":  # true division of integers is float32, as in PyTorch
        a, b = _floating(a), _floating(b)
    return _binary(Div, "div", a, b)


def neg(x):
    return Neg.apply(_tensor(x))


def pow(x, p):
    p = _number(p)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and isinstance(x, Tensor):
        return PowScalar.apply(_floating(x) if isinstance(p, float) else x, p=p)
    return _binary(Pow, "pow", x, p)


def exp(x):
    return Exp.apply(_floating(x))


def log(x):
    return Log.apply(_floating(x))


def sqrt(x):
    return Sqrt.apply(_floating(x))


def tanh(x):
    return Tanh.apply(_floating(x))


def sigmoid(x):
    return Sigmoid.apply(_floating(x))


def relu(x):
    return Relu.apply(_tensor(x))


def erf(x):
    return Erf.apply(_floating(x))


def gelu(x, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return Gelu.apply(_floating(x), approximate=approximate)


def abs(x):
    return Abs.apply(_tensor(x))


def maximum(a, b):
    return _binary(Maximum, "maximum", a, b)


def minimum(a, b):
    a, b = _pair(a, b, "minimum")
    return neg(maximum(neg(a), neg(b)))


def _number(v):
    """A numpy scalar or 0-d array as a Python number: a np.float64 constant would promote float32 data to
    float64 (numpy 2 keeps a 0-d array's dtype as it keeps a numpy scalar's)."""
    return v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0) else v


def clip(x, lo=None, hi=None):
    lo, hi = _number(lo), _number(hi)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clip: lower bound {lo} is above upper bound {hi}")
    x = _floating_for(_tensor(x), lo, hi)
    return Clip.apply(x, lo=lo, hi=hi)


def where(cond, a, b):
    """Elements of a where cond holds, else of b; cond is constant (no gradient flows to it)."""
    cond = cond.data if isinstance(cond, Tensor) else np.asarray(cond)
    if cond.dtype != np.bool_:
        raise TypeError(f"where: the condition must be boolean, not {cond.dtype}")
    a, b = _pair(a, b, "where")
    try:
        return Where.apply(a, b, cond=cond.copy())  # backward must see this condition, whatever happens to it
    except ValueError as e:
        raise ValueError(
            f"where: shapes {cond.shape}, {a.data.shape} and {b.data.shape} do not broadcast together"
        ) from e


def cast(x, dtype):
    dtype = np.dtype(dtype)
    x = _tensor(x)
    if x.data.dtype == dtype:
        return x
    if x.requires_grad and dtype not in FLOAT_DTYPES:
        raise TypeError(f"cast: a tensor that requires grad can only be cast to a float dtype, not {dtype}")
    return Cast.apply(x, dtype=dtype)


def _check_not_over_nothing(name, x, axes):
    """Refuse a reduction with no value to reduce (an empty axis among `axes`); an empty tensor reduced over
    axes that are not empty gives an empty result."""
    if x.data.size == 0 and not all(x.data.shape[a] for a in axes):
        raise ValueError(f"{name} over an empty axis of a tensor of shape {x.data.shape}")


def sum(x, axis=None, keepdims=False):
    x = _tensor(x)
    return Sum.apply(x, axes=_axes(axis, x.data.ndim), keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    x = _floating(x)
    axes = _axes(axis, x.data.ndim)
    _check_not_over_nothing("mean", x, axes)
    return Mean.apply(x, axes=axes, keepdims=keepdims)


def max(x, axis=None, keepdims=False):
    x = _tensor(x)
    axes = _axes(axis, x.data.ndim)
    _check_not_over_nothing("max", x, axes)
    return Max.apply(x, axes=axes, keepdims=keepdims, minimum=False)


def min(x, axis=None, keepdims=False):
    x = _tensor(x)
    axes = _axes(axis, x.data.ndim)
    _check_not_over_nothing("min", x, axes)
    return Max.apply(x, axes=axes, keepdims=keepdims, minimum=True)


def var(x, axis=None, keepdims=False, correction=0):
    """Variance over axes; correction=1 gives the unbiased estimate (numpy's ddof)."""
    x = _floating(x)
    return Var.apply(x, axes=_axes(axis, x.data.ndim), keepdims=keepdims, correction=correction)


def reshape(x, shape):
    x = _tensor(x)
    if isinstance(shape, int):
        shape = (shape,)
    try:
        return Reshape.apply(x, shape=tuple(shape))
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.data.shape} into {tuple(shape)}") from None


def transpose(x, axes=None):
    x = _tensor(x)
    ndim = x.data.ndim
    axes = tuple(reversed(range(ndim))) if axes is None else _axes(tuple(axes), ndim)
    if sorted(axes) != list(range(ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of a {ndim}-d tensor's axes")
    return Transpose.apply(x, axes=axes)


def swapaxes(x, a, b):
    x = _tensor(x)
    ndim = x.data.ndim
    if not (-ndim <= a < ndim and -ndim <= b < ndim):  # (_axes lets a 0-d tensor's axis 0 pass)
        raise ValueError(f"swapaxes: axes {a} and {b} are out of range for a {ndim}-d tensor")
    axes = list(range(ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(x, axes)


def squeeze(x, axis=None):
    x = _tensor(x)
    shape = x.data.shape
    if axis is None:
        return reshape(x, tuple(n for n in shape if n != 1))
    axes = _axes(axis, len(shape))
    for a in axes:
        if shape[a] != 1:
            raise ValueError(f"squeeze: axis {a} has length {shape[a]}, not 1")
    return reshape(x, tuple(n for i, n in enumerate(shape) if i not in axes))


def unsqueeze(x, axis):
    x = _tensor(x)
    shape = list(x.data.shape)
    if not -len(shape) - 1 <= axis <= len(shape):
        raise ValueError(f"unsqueeze: axis {axis} is out of range for a {len(shape)}-d tensor "
                         f"(from {-len(shape) - 1} to {len(shape)})")
    axis = axis % (len(shape) + 1)
    shape.insert(axis, 1)
    return reshape(x, tuple(shape))


def broadcast_to(x, shape):
    x = _tensor(x)
    try:
        return BroadcastTo.apply(x, shape=tuple(shape))
    except ValueError:
        raise ValueError(f"broadcast_to: a tensor of shape {x.data.shape} cannot broadcast to {tuple(shape)}") from None


def _is_basic_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    for p in parts:
        if not (p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer))):
            return False
    return True


def _normalize_index(index):
    def one(p):
        if isinstance(p, Tensor):
            p = p.data
        if isinstance(p, list):
            p = np.asarray(p)
        if isinstance(p, _ndarray):
            if p.dtype == np.bool_:
                return np.nonzero(p)
            if p.dtype.kind not in "iu":
                raise IndexError(f"index arrays must be integer or boolean, not {p.dtype}")
            return (p,)
        return (p,)

    parts = index if isinstance(index, tuple) else (index,)
    flat = []
    for p in parts:
        flat.extend(one(p))
    return tuple(flat) if len(flat) != 1 or isinstance(index, tuple) else flat[0]


def getitem(x, index):
    x = _tensor(x)
    index = _normalize_index(index)
    try:
        return GetItem.apply(x, index=index)
    except IndexError as e:
        raise IndexError(f"index into a tensor of shape {x.data.shape}: {e}") from None


def gather(x, axis, index):
    """out[..., i, ...] = x[..., index[..., i, ...], ...] along `axis` (numpy's take_along_axis)."""
    x = _tensor(x)
    idx = index.data if isinstance(index, Tensor) else np.asarray(index)
    if idx.ndim != x.data.ndim:
        raise ValueError(f"gather: index has {idx.ndim} dimensions but the tensor has {x.data.ndim}")
    axis = axis % x.data.ndim
    grids = list(np.ogrid[tuple(slice(n) for n in idx.shape)])
    grids[axis] = idx
    return getitem(x, tuple(grids))


def _tensors_to_join(tensors):
    """The Tensors to concatenate or stack: beside a floating tensor, constants (arrays, lists) take the
    first such tensor's dtype, as in every binary op; otherwise they become Tensors as Tensor() makes them."""
    tensors = list(tensors)
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or first.data.dtype.kind != "f":
        return [_tensor(t) for t in tensors]
    return [t if isinstance(t, Tensor) else _const(t, first.data.dtype) for t in tensors]


def concatenate(tensors, axis=0):
    tensors = _tensors_to_join(tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    dtypes = {t.data.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"concatenate: dtypes differ: {sorted(str(d) for d in dtypes)}")
    try:
        return Concat.apply(*tensors, axis=axis)
    except (ValueError, np.exceptions.AxisError) as e:
        shapes = [t.data.shape for t in tensors]
        raise ValueError(f"concatenate along axis {axis}: shapes {shapes} do not fit ({e})") from None


def stack(tensors, axis=0):
    tensors = _tensors_to_join(tensors)
    if len({t.data.shape for t in tensors}) > 1:
        raise ValueError(f"stack: shapes differ: {[t.data.shape for t in tensors]}")
    return concatenate([unsqueeze(t, axis) for t in tensors], axis=axis)


def pad(x, pad_width, value=0):
    value = _number(value)
    x = _floating_for(_tensor(x), value)
    try:
        widths = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (x.data.ndim, 2))
    except ValueError:
        raise ValueError(f"pad: widths {pad_width} do not fit a {x.data.ndim}-d tensor") from None
    if (widths < 0).any():
        raise ValueError(f"pad: widths must be non-negative, got {pad_width}")
    pad_width = tuple((int(lo), int(hi)) for lo, hi in widths)
    return Pad.apply(x, pad_width=pad_width, value=value)


def matmul(a, b):
    a, b = _pair(a, b, "matmul")
    sa, sb = a.data.shape, b.data.shape
    if not sa or not sb:
        raise ValueError("matmul: operands must have at least one dimension (use * for scalars)")
    if len(sa) == 1 and len(sb) == 1:
        if sa != sb:
            raise ValueError(f"matmul: vectors of lengths {sa[0]} and {sb[0]} differ")
        return reshape(matmul(reshape(a, (1, sa[0])), reshape(b, (sb[0], 1))), ())
    if len(sa) == 1:
        return squeeze(matmul(reshape(a, (1, sa[0])), b), -2)
    if len(sb) == 1:
        return squeeze(matmul(a, reshape(b, (sb[0], 1))), -1)
    if sa[-1] != sb[-2]:
        raise ValueError(f"matmul: shapes {sa} and {sb} do not line up: {sa[-1]} != {sb[-2]}")
    try:
        return MatMul.apply(a, b)
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of {sa} and {sb} do not broadcast") from None


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight (out_features, in_features) as in PyTorch."""
    x = _tensor(x)
    weight, bias = _weight(weight, x), _weight(bias, x)
    wshape = weight.data.shape
    if len(wshape) != 2:
        raise ValueError(f"linear: weight must be 2-d (out_features, in_features), got {wshape}")
    if x.data.ndim == 0 or x.data.shape[-1] != wshape[1]:
        raise ValueError(f"linear: input of shape {x.data.shape} does not end in in_features={wshape[1]}")
    if x.data.dtype != weight.data.dtype:
        raise TypeError(f"linear: input dtype {x.data.dtype} differs from weight dtype {weight.data.dtype}")
    if bias is None:
        return Linear.apply(x, weight)
    if bias.data.shape != (wshape[0],):
        raise ValueError(f"linear: bias of shape {bias.data.shape} does not match out_features={wshape[0]}")
    return Linear.apply(x, weight, bias)


def softmax(x, axis=-1, *, scale=None, mask=None):
    """softmax(x * scale) over axis. mask: booleans broadcasting to x, False where an entry takes no part
    (weight 0, as where(mask, x, -inf) would give; attention's causal mask). A row with no entry left is NaN,
    as in PyTorch."""
    x = _floating(x)
    _axes(axis, x.data.ndim)
    hidden = None
    if mask is not None:
        mask = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"softmax: the mask must be boolean, not {mask.dtype}")
        try:
            fits = np.broadcast_shapes(mask.shape, x.data.shape) == x.data.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"softmax: mask of shape {mask.shape} does not broadcast to {x.data.shape}")
        hidden = ~mask
    if scale is not None:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax: scale must be finite, got {scale}")
        scale = x.data.dtype.type(scale)  # a Python float would not change the dtype; a numpy scalar keeps it
    return Softmax.apply(x, axis=axis, scale=scale, hidden=hidden)


def log_softmax(x, axis=-1):
    x = _floating(x)
    _axes(axis, x.data.ndim)
    return LogSoftmax.apply(x, axis=axis)


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(where, reduction):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:  # class weights given by position, say
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, not {reduction!r:.60}")


def cross_entropy(logits, target, reduction="mean", ignore_index=-100):
    """Mean (or sum, or per-item) negative log-likelihood of integer `target` under softmax(logits).

    logits: (..., C) float; target: (...) integer classes. Targets equal to ignore_index count for
    nothing (the mean is over the others). Classes are the last axis (PyTorch puts them second).
    With no target counted (all ignored, or an empty batch) the mean is 0.0 with a zero gradient, where
    PyTorch gives nan: an all-padding batch adds nothing to a summed loss instead of poisoning it.
    """
    logits = _tensor(logits)
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    check_reduction("cross_entropy", reduction)
    if logits.data.dtype.kind != "f":
        raise TypeError(f"cross_entropy: logits must be floating point, not {logits.data.dtype}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class indices, not {t.dtype}")
    if logits.data.ndim == 0 or logits.data.shape[:-1] != t.shape:
        raise ValueError(
            f"cross_entropy: logits of shape {logits.data.shape} need targets of shape "
            f"{logits.data.shape[:-1]}, got {t.shape}"
        )
    return CrossEntropy.apply(logits, target=t, reduction=reduction, ignore_index=ignore_index)


def mse_loss(x, y, reduction="mean"):
    x, y = _pair(x, y, "mse_loss")
    if x.data.dtype.kind != "f":  # integers and booleans: float32 (numpy would make float64)
        x, y = _floating(x), _floating(y)
    if x.data.shape != y.data.shape:
        raise ValueError(f"mse_loss: input shape {x.data.shape} differs from target shape {y.data.shape}")
    check_reduction("mse_loss", reduction)
    return MSE.apply(x, y, reduction=reduction)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = _floating(x)
    weight, bias = _weight(weight, x), _weight(bias, x)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(normalized_shape)
    if x.data.shape[x.data.ndim - k :] != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {x.data.shape} does not end in {normalized_shape}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.data.shape != normalized_shape:
            raise ValueError(f"layer_norm: {name} of shape {p.data.shape} is not {normalized_shape}")
    axes = tuple(range(x.data.ndim - k, x.data.ndim))
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight")
    params = [p for p in (weight, bias) if p is not None]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.data.dtype != x.data.dtype:
            raise TypeError(f"layer_norm: {name} is {p.data.dtype} but the input is {x.data.dtype}")
    return LayerNorm.apply(x, *params, axes=axes, eps=float(eps))


def _pair2(v, name):
    v = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(v) != 2 or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(int(a) for a in v)


def _window(kernel_size, stride, padding):
    """Kernel, stride (None: the kernel's) and padding as pairs of ints, checked: kernel and stride positive,
    padding non-negative."""
    kernel = _pair2(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair2(stride, "stride")
    padding = _pair2(padding, "padding")
    if builtins.min(stride) < 1 or builtins.min(kernel) < 1 or builtins.min(padding) < 0:
        raise ValueError(f"kernel {kernel} and stride {stride} must be positive, padding {padding} non-negative")
    return kernel, stride, padding


def unfold(x, kernel_size, stride=1, padding=0, pad_value=0):
    """(N, C, H, W) -> (N, C*kh*kw, OH*OW): each column one kernel window, channel-major."""
    pad_value = _number(pad_value)
    x = _floating_for(_tensor(x), pad_value)
    if x.data.ndim != 4:
        raise ValueError(f"expected a 4-d input (N, C, H, W), got shape {x.data.shape}")
    kernel, stride, padding = _window(kernel_size, stride, padding)
    h, w = x.data.shape[2] + 2 * padding[0], x.data.shape[3] + 2 * padding[1]
    if kernel[0] > h or kernel[1] > w:
        raise ValueError(f"kernel {kernel} is larger than the padded input ({h}, {w})")
    return Unfold.apply(x, kernel=kernel, stride=stride, padding=padding, pad_value=pad_value)


def _out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-d cross-correlation, NCHW input, (out_channels, in_channels, kh, kw) weight, as in PyTorch."""
    x = _tensor(x)
    weight, bias = _weight(weight, x), _weight(bias, x)
    if weight.data.ndim != 4:
        raise ValueError(f"conv2d: weight must be 4-d (out, in, kh, kw), got {weight.data.shape}")
    if x.data.ndim != 4:
        raise ValueError(f"conv2d: expected input (N, C, H, W), got shape {x.data.shape}")
    n, c, h, w = x.data.shape
    o, ci, kh, kw = weight.data.shape
    if o == 0:
        raise ValueError(f"conv2d: weight of shape {weight.data.shape} has no output channels")
    if c != ci:
        raise ValueError(f"conv2d: input has {c} channels but the weight expects {ci}")
    if x.data.dtype != weight.data.dtype:
        raise TypeError(f"conv2d: input dtype {x.data.dtype} differs from weight dtype {weight.data.dtype}")
    stride, padding = _pair2(stride, "stride"), _pair2(padding, "padding")
    cols = unfold(x, (kh, kw), stride, padding)  # (N, C*kh*kw, L)
    if bias is not None:
        if bias.data.shape != (o,):
            raise ValueError(f"conv2d: bias of shape {bias.data.shape} does not match {o} output channels")
        if bias.data.dtype != weight.data.dtype:
            raise TypeError(f"conv2d: bias dtype {bias.data.dtype} differs from weight dtype {weight.data.dtype}")
    out = ConvCols.apply(cols, weight) if bias is None else ConvCols.apply(cols, weight, bias)  # (N, O, L)
    return reshape(out, (n, o, _out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1])))


def _pool(x, kernel_size, stride, padding, reduce, pad_value):
    x = _tensor(x)
    if x.data.ndim != 4:
        raise ValueError(f"pooling expects input (N, C, H, W), got shape {x.data.shape}")
    kernel, stride, padding = _window(kernel_size, stride, padding)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"pooling: padding {padding} must be at most half the kernel {kernel} "
                         "(else some windows hold only padding)")
    n, c, h, w = x.data.shape
    oh, ow = _out_size(h, kernel[0], stride[0], padding[0]), _out_size(w, kernel[1], stride[1], padding[1])
    if kernel == stride and padding == (0, 0) and h % kernel[0] == 0 and w % kernel[1] == 0:
        # non-overlapping windows tile the image: no unfold copy
        if reduce is max:
            return MaxPoolTiles.apply(x, kernel=kernel)
        tiles = reshape(x, (n, c, oh, kernel[0], ow, kernel[1]))
        return reduce(tiles, (3, 5))
    cols = unfold(x, kernel, stride, padding, pad_value)
    cols = reshape(cols, (n, c, kernel[0] * kernel[1], oh, ow))
    if reduce is not max:
        return reduce(cols, 2)
    inside = None
    if padding != (0, 0):  # which cells of each window are the image's, not padding (see MaxOverWindow)
        inside = _unfold_array(np.ones((1, 1, h, w), bool), kernel, stride, padding, False)
        inside = inside.reshape(1, 1, kernel[0] * kernel[1], oh, ow)
    return MaxOverWindow.apply(cols, inside=inside)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    x = _tensor(x)
    return _pool(x, kernel_size, stride, padding, max, _lowest(x.data.dtype))


def _lowest(dtype):
    """The padding that never wins a maximum: -inf, or an integer dtype's minimum (max keeps integers)."""
    if dtype.kind == "f":
        return -np.inf
    return np.iinfo(dtype).min if dtype.kind in "iu" else False


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average pooling; padded zeros count in the average (PyTorch's count_include_pad=True)."""
    return _pool(x, kernel_size, stride, padding, mean, 0.0)


def embedding(indices, weight):
    """Rows of weight (num_embeddings, dim) picked by integer indices of any shape."""
    idx = indices.data if isinstance(indices, Tensor) else np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, not {idx.dtype}")
    num = weight.data.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise IndexError(f"embedding: index {bad} is out of range for a table of {num} rows")
    return getitem(weight, idx)


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when not training.

    Integer and boolean input gives float32 (the scale is not an integer), in training or not."""
    x = _floating(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    rng = rng or default_rng()
    keep = rng.random(x.data.shape, dtype=np.float32) >= p
    return mul(x, Tensor._from_op(keep * x.data.dtype.type(1 / (1 - p)), None))
