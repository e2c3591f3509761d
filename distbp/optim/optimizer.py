"""Optimizer: parameter groups, per-parameter state, and a state_dict that round-trips exactly."""

import copy
import math
import numbers

import numpy as np
from scipy.linalg import blas

from ..autograd.tensor import Tensor


class Optimizer:
    """Base of SGD, Adam and AdamW.

    params: an iterable of parameters, or of dicts {"params": [...], **overrides} (parameter groups).
    Subclasses implement `step()` and list their hyper-parameters in `defaults`.
    """

    # The per-parameter state step() keeps, name -> "array" (shaped like its parameter) or "count" (an
    # integer >= 0); loading refuses other names. None: not declared, anything loads.
    state_entries = None
    # True: a parameter's state holds all of state_entries or nothing (made together at its first step);
    # False: any of them may be absent (made when first needed)
    state_all_or_none = False

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}  # parameter -> dict of arrays and counters
        self.param_groups = []
        if isinstance(params, Tensor):  # iterating it would give its rows
            raise TypeError(f"{type(self).__name__}: params must be an iterable of parameters (or of parameter "
                            f"groups), not one tensor: pass [p]")
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
            if not p.is_leaf:  # (a frozen parameter is taken, as in PyTorch: it steps once it has a gradient)
                raise ValueError(f"{type(self).__name__}: a tensor of shape {p.shape} computed from others is not a "
                                 "parameter (optimize the tensors it came from)")
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
        if not is_finite_real(lr) or lr < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {lr!r}")
        wd = group.get("weight_decay", 0)
        if not is_finite_real(wd) or wd < 0:
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
            if not isinstance(p.grad, Tensor):  # (numpy's .data is a memoryview: an AttributeError about that)
                raise TypeError(f"{type(self).__name__}: the .grad of a parameter of shape {p.shape} is a "
                                f"{type(p.grad).__name__}, not a Tensor (assign Tensor(array), or None)")
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
        hyper, entries_of = self._check_state_dict(state_dict)
        new_state = {p: self._copied_state(entries, p) for p, entries in entries_of}
        for own, values in zip(self.param_groups, hyper):
            own.update(values)
        self.state = new_state

    def check_state_dict(self, state_dict):
        """Raise, naming the first problem, if load_state_dict would refuse state_dict; changes nothing.

        For loaders that must check every part of a file (model, optimizer, schedule) before changing any.
        """
        self._check_state_dict(state_dict)

    def _check_state_dict(self, state_dict):
        """(each group's hyper-parameters as they would be after loading, [(parameter, its saved state)])."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"optimizer state_dict is a {type(state_dict).__name__}, not a dict")
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if groups is None or states is None:
            raise KeyError("optimizer state_dict needs 'state' and 'param_groups'")
        if not isinstance(groups, (list, tuple)) or not isinstance(states, dict):
            raise TypeError("optimizer state_dict: 'param_groups' must be a list and 'state' a dict")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state_dict has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        by_index = {}
        hyper = []
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"optimizer state_dict group {i} is not a dict with a 'params' list")
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"optimizer state_dict group {i} has {len(saved['params'])} parameters, "
                    f"this optimizer {len(own['params'])}"
                )
            for idx, p in zip(saved["params"], own["params"]):
                idx = _index(idx)
                if idx in by_index:
                    raise ValueError(f"optimizer state_dict lists parameter index {idx} more than once")
                by_index[idx] = p
            unknown = set(saved) - set(self.defaults) - {"params"}
            if unknown:
                raise KeyError(f"optimizer state_dict group {i} has unknown hyper-parameters {sorted(unknown)}")
            values = {k: v for k, v in own.items() if k != "params"}
            values.update({k: _plain(copy.deepcopy(v)) for k, v in saved.items() if k != "params"})
            self._validate(values)
            hyper.append(values)
        entries_of, loaded = [], set()
        for idx, entries in states.items():
            idx = _index(idx)
            if idx not in by_index:
                raise KeyError(f"optimizer state_dict has state for unknown parameter index {idx}")
            if idx in loaded:  # under both 1 and "1"
                raise ValueError(f"optimizer state_dict has state for parameter index {idx} more than once")
            loaded.add(idx)
            self.check_param_state(entries, by_index[idx], f"parameter {idx}")
            entries_of.append((by_index[idx], entries))
        return hyper, entries_of

    def state_dtype(self, param):
        """The dtype of the state arrays step() keeps for param: the parameter's (Adam keeps float16's in float32)."""
        return param.data.dtype

    def _copied_state(self, entries, param):
        """Checked entries as the optimizer keeps them: arrays copied in state_dtype(param), counters ints."""
        kinds = self.state_entries or {}
        copied = {}
        dtype = self.state_dtype(param)
        for key, value in entries.items():
            if isinstance(value, (np.ndarray, Tensor)):
                copied[key] = np.array(value.data if isinstance(value, Tensor) else value, dtype=dtype)
            elif kinds.get(key) == "count":
                copied[key] = int(value)
            else:
                copied[key] = copy.deepcopy(value)
        return copied

    def check_param_state(self, entries, param, where):
        """Raise unless entries (name -> array or number) is state step() can use for param; where names it.

        Arrays must be floating point and shaped like param; counters integers >= 0; the entries those of
        `state_entries`, all of them if `state_all_or_none`.
        """
        if not isinstance(entries, dict):
            raise TypeError(f"optimizer state for {where} is a {type(entries).__name__}, not a dict")
        name, declared = type(self).__name__, self.state_entries
        if declared is not None:
            unknown = [k for k in entries if k not in declared]
            if unknown:
                raise ValueError(f"optimizer state for {where} has entries {unknown} that {name} does not keep "
                                 f"(it keeps {list(declared)})")
            missing = [k for k in declared if k not in entries]
            if entries and missing and self.state_all_or_none:
                raise ValueError(f"optimizer state for {where} lacks {missing}: {name} needs {list(declared)} "
                                 "together")
        for key, value in entries.items():
            is_array = isinstance(value, (np.ndarray, Tensor))
            kind = declared[key] if declared is not None else ("array" if is_array else None)
            if kind == "array":
                if not is_array:
                    raise TypeError(f"optimizer state {key!r} for {where} is a {type(value).__name__}, not an array")
                arr = value.data if isinstance(value, Tensor) else value
                if arr.dtype.kind != "f":
                    raise TypeError(f"optimizer state {key!r} for {where} has dtype {arr.dtype}, not floating point")
                if arr.shape != param.data.shape:
                    raise ValueError(
                        f"optimizer state {key!r} for {where} has shape {arr.shape}, the parameter {param.data.shape}"
                    )
            elif kind == "count":
                if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"optimizer state {key!r} for {where} is {value!r}, not an integer >= 0")

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} parameters, {hp}")
        return "\n".join(lines) + "\n)"


def is_finite_real(value):
    """A finite real number, and not a bool (True would pass as 1; a nan hyper-parameter passes every
    comparison check and turns the parameters into nan at the first step)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _index(idx):
    """A parameter index of a state_dict: an int, or its decimal string (JSON object keys are strings)."""
    if isinstance(idx, str) and idx.isdecimal():
        return int(idx)
    if isinstance(idx, numbers.Integral) and not isinstance(idx, bool) and idx >= 0:
        return int(idx)
    raise ValueError(f"optimizer state_dict: parameter index {idx!r} is not an integer >= 0")


def _plain(value):
    """numpy scalars as Python numbers: a np.float64 learning rate would turn float32 updates into float64."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):  # betas, given either way
        return type(value)(_plain(v) for v in value)
    return value


_AXPY = {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}


def axpy(alpha, x, y):
    """y += alpha * x in place: one BLAS pass, no temporary (the update of every step, on every parameter)."""
    if y.size == 0:  # BLAS refuses empty vectors
        return
    routine = _AXPY.get(y.dtype)
    if routine is not None and x.dtype == y.dtype and y.flags.c_contiguous and x.flags.c_contiguous:
        routine(x.reshape(-1), y.reshape(-1), a=alpha)
    else:
        y += alpha * x
