"""Gradient utilities."""

import math
import numbers

import numpy as np

from ..autograd.tensor import Tensor


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, *, eps=1e-6):
    """Scale all gradients together so that their global norm (the norm_type-norm of all their values: 2,
    inf or any other p > 0, as in PyTorch) is at most max_norm; returns the norm before.

    A NaN or infinite gradient makes the norm NaN or inf, returned as is with the gradients left alone, so
    the caller can skip the step. Finite gradients are clipped even when the squares of their 2-norm
    overflow their dtype (float32 past |g| ~ 1.8e19); the norm returned is then inf only past float64's range.
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
        with np.errstate(over="ignore"):  # (overflowing squares of finite values are handled below)
            total = math.sqrt(sum(float(np.dot(f, f)) for f in flat))
        if total == math.inf and all(np.isfinite(g).all() for g in grads):  # the squares overflowed, not the values
            return _clip_2_norm_past_overflow(grads, max_norm)
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


def _clip_2_norm_past_overflow(grads, max_norm):
    """clip_grad_norm_'s 2-norm case for finite gradients whose squares overflow: the norm is the largest |g|
    times the norm of the gradients divided by it (at most sqrt(size)), in float64, and each gradient is
    scaled by those two factors in turn, so that no step under- or overflows. Returns the norm."""
    largest = np.float64(max(float(np.max(np.abs(g))) for g in grads if g.size))
    ratio = math.sqrt(sum(float(np.dot(f, f)) for f in (g.ravel() / largest for g in grads)))
    total = float(largest) * ratio  # inf only past float64's range
    if total > max_norm:
        for g in grads:
            np.multiply(g / largest, max_norm / ratio, out=g, casting="unsafe")
    return total
