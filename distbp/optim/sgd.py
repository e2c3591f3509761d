"""SGD with momentum, Nesterov momentum and L2 weight decay (PyTorch's formulation)."""

import numpy as np

from .optimizer import Optimizer, axpy, is_finite_real


class SGD(Optimizer):
    state_entries = {"momentum_buffer": "array"}  # made at the first step with momentum, so it may be absent

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _validate(self, group):
        super()._validate(group)
        if not is_finite_real(group["momentum"]) or group["momentum"] < 0:
            raise ValueError(f"SGD: invalid momentum {group['momentum']!r}")
        if not is_finite_real(group["dampening"]):
            raise ValueError(f"SGD: invalid dampening {group['dampening']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0")

    def step(self):
        for group in self.param_groups:
            # as Python floats: a numpy float64 written into a group after construction would promote the update
            lr, momentum, dampening = float(group["lr"]), float(group["momentum"]), float(group["dampening"])
            wd, nesterov = float(group["weight_decay"]), group["nesterov"]
            for p, g, state in self._grads(group):
                if wd:
                    g = g + wd * p
                if momentum:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = np.array(g, dtype=p.dtype, copy=True)
                    else:
                        buf *= momentum
                        axpy(1 - dampening, g, buf)
                    g = g + momentum * buf if nesterov else buf
                axpy(-lr, g, p)
