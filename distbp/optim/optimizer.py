"""Optimizer: parameter groups, per-parameter state, and a state_dict that round-trips exactly."""

import copy
import numbers

import numpy as np
from scipy.linalg import blas

from ..autograd.tensor import Tensor


class Optimizer:
    """Base of SGD, Adam and AdamW.

    params: an iterable of parameters, or of dicts {"params": [...], **overrides} (parameter groups).
    Subclasses implement `step()` and list their hyper-parameters in `defaults`.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}  # parameter -> dict of arrays and counters
        self.param_groups = []
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: expected parameters, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"{type(self).__name__}: a parameter of shape {p.shape} does not require grad")
        seen = set()
        for i, p in enumerate(params):
            if id(p) in seen:  # it would be stepped once per listing
                raise ValueError(f"{type(self).__name__}: the parameter at position {i} of the group (shape {p.shape}) "
                                 "is listed more than once")
            seen.add(id(p))
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in params):
            raise ValueError(f"{type(self).__name__}: a parameter appears in more than one group")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise KeyError(f"{type(self).__name__}: unknown hyper-parameters {sorted(unknown)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        for key in list(group):
            if key != "params":
                group[key] = _plain(group[key])
        self._validate(group)
        group["params"] = params
        self.param_groups.append(group)

    def _validate(self, group):
        """Check one group's hyper-parameters (after defaults are filled in); subclasses add their own."""
        lr = group.get("lr")
        if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or lr < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {lr!r}")
        wd = group.get("weight_decay", 0)
        if not isinstance(wd, numbers.Real) or wd < 0:
            raise ValueError(f"{type(self).__name__}: invalid weight_decay {wd!r}")

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.data[...] = 0

    def step(self):
        raise NotImplementedError

    def _grads(self, group):
        """(parameter array, gradient array, state dict) for each parameter of group that has a gradient."""
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.data
            if g.shape != p.data.shape or g.dtype != p.data.dtype:
                raise ValueError(
                    f"{type(self).__name__}: gradient {g.shape} {g.dtype} does not match its parameter "
                    f"{p.data.shape} {p.data.dtype}"
                )
            p._bump_version()  # the update is an in-place change: a graph that saved p can no longer use it
            yield p.data, g, self.state.setdefault(p, {})

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self):
        """{'state': {index: {name: array or number}}, 'param_groups': [{hyper-parameters, 'params': [index]}]}.

        Parameters are named by their position across the groups, as in PyTorch.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[index[id(p)]] = {
                        k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.state[p].items()
                    }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and per-parameter state; any mismatch is named before anything changes."""
        groups = state_dict.get("param_groups")
        if groups is None or "state" not in state_dict:
            raise KeyError("optimizer state_dict needs 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state_dict has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        by_index = {}
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"optimizer state_dict group {i} has {len(saved['params'])} parameters, "
                    f"this optimizer {len(own['params'])}"
                )
            for idx, p in zip(saved["params"], own["params"]):
                by_index[idx] = p
        new_state = {}
        for idx, entries in state_dict["state"].items():
            idx = int(idx)
            if idx not in by_index:
                raise KeyError(f"optimizer state_dict has state for unknown parameter index {idx}")
            p = by_index[idx]
            restored = {}
            for k, v in entries.items():
                if isinstance(v, (np.ndarray, Tensor)):
                    arr = np.array(v.data if isinstance(v, Tensor) else v, copy=True)
                    if arr.shape != p.data.shape:
                        raise ValueError(
                            f"optimizer state {k!r} for parameter {idx} has shape {arr.shape}, "
                            f"the parameter {p.data.shape}"
                        )
                    restored[k] = arr.astype(p.data.dtype, copy=False)
                else:
                    restored[k] = v
            new_state[p] = restored
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = copy.deepcopy(v)
        self.state = new_state

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} parameters, {hp}")
        return "\n".join(lines) + "\n)"


def _plain(value):
    """numpy scalars as Python numbers: a np.float64 learning rate would turn float32 updates into float64."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


_AXPY = {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}


def axpy(alpha, x, y):
    """y += alpha * x in place: one BLAS pass, no temporary (the update of every step, on every parameter)."""
    routine = _AXPY.get(y.dtype)
    if routine is not None and x.dtype == y.dtype and y.flags.c_contiguous and x.flags.c_contiguous:
        routine(x.reshape(-1), y.reshape(-1), a=alpha)
    else:
        y += alpha * x
