"""Gradient utilities."""

import math

import numpy as np

from ..autograd.tensor import Tensor


def clip_grad_norm_(parameters, max_norm, eps=1e-6):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm before.

    A non-finite norm is returned as is and the gradients are left alone, so the caller can skip the step.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad.data for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
    if not math.isfinite(total):
        return total
    scale = max_norm / (total + eps)
    if scale < 1:
        for g in grads:
            g *= g.dtype.type(scale)
    return total
