"""Adam (L2 weight decay in the gradient) and AdamW (decoupled weight decay), as PyTorch defines them."""

import math

import numpy as np

from .optimizer import Optimizer, is_finite_real


class Adam(Optimizer):
    """Adam, and (decoupled = True) AdamW.

    float16 parameters: the moments are kept in float32 and the update is computed in float32, then rounded
    into the parameter (in float16, eps=1e-8 is 0, so a zero gradient gives 0/0, and g*g overflows from
    |g| = 256 on). Their state, saved and loaded, is float32.
    """

    decoupled = False
    state_entries = {"step": "count", "exp_avg": "array", "exp_avg_sq": "array"}
    state_all_or_none = True  # step() makes all three at a parameter's first step and then needs them all

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _validate(self, group):
        super()._validate(group)
        betas = group["betas"]
        two = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not two or not all(is_finite_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: betas must be two numbers in [0, 1), got {betas!r}")
        group["betas"] = tuple(betas)
        if not is_finite_real(group["eps"]) or group["eps"] < 0:
            raise ValueError(f"{type(self).__name__}: invalid eps {group['eps']}")

    def state_dtype(self, param):
        return np.dtype(np.float32) if param.data.dtype == np.float16 else param.data.dtype

    def step(self):
        for group in self.param_groups:
            # as Python floats: a numpy float64 written into a group after construction would promote the update
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            b1, b2 = (float(b) for b in group["betas"])
            for param, g, state in self._grads(group):
                p = param
                if param.dtype == np.float16:  # the update in float32 (see the class docstring)
                    p, g = param.astype(np.float32), g.astype(np.float32)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros_like(p)
                    state["exp_avg_sq"] = np.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                if wd:
                    if self.decoupled:
                        p *= 1 - lr * wd
                    else:
                        g = g + wd * p
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                step_size = lr / (1 - b1**t)
                denom = np.sqrt(v)
                denom /= math.sqrt(1 - b2**t)
                denom += eps
                p -= step_size * (m / denom)
                if p is not param:
                    param[...] = p


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
