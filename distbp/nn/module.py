"""Module and Parameter: the PyTorch-shaped containers for layers and their weights."""

from collections import OrderedDict

import numpy as np

from ..autograd.tensor import FLOAT_DTYPES, Tensor


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as trainable: requires_grad by default."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base of every layer: holds parameters, buffers and child modules registered by attribute.

    Subclasses set attributes in __init__ and define forward(); calling the module runs forward.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration --------------------------------------------------------------------------------

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting attributes")
        if value is not None and (self._parameters.get(name) is value or self._modules.get(name) is value):
            return  # the same object again (w -= lr * w.grad rebinds the name to w): keep the order
        # A registered name takes only another Parameter or Module (or None): silently unregistering a
        # parameter over a plain value would drop it from the optimizer and the state_dict.
        registered = "parameter" if name in self._parameters else "submodule" if name in self._modules else None
        if registered and value is not None and not isinstance(value, (Parameter, Module)):
            raise TypeError(f"cannot assign a {type(value).__name__} to {registered} {name!r} of "
                            f"{type(self).__name__} (a Parameter, a Module or None is expected)")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            if isinstance(value, np.generic):  # what numpy returns for a 0-d buffer updated out of place
                value = np.asarray(value)
            elif value is not None and not isinstance(value, (np.ndarray, Tensor)):
                raise TypeError(f"cannot assign a {type(value).__name__} to buffer {name!r} of {type(self).__name__} "
                                "(an array, a Tensor or None is expected)")
            self._buffers[name] = value
            object.__setattr__(self, name, value)
            return
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name, value, persistent=True):
        """A non-trainable array that belongs to the module's state (e.g. an attention mask).

        A None buffer is a placeholder: it stays out of state_dict until it holds an array.
        """
        if not isinstance(name, str):
            raise TypeError(f"register_buffer: the name must be a str, not {type(name).__name__}")
        if not name or "." in name:
            raise KeyError(f"register_buffer: the name must be non-empty and contain no '.', got {name!r}")
        if name not in self._buffers and hasattr(self, name):  # a parameter, a submodule or a plain attribute
            raise KeyError(f"register_buffer: attribute {name!r} already exists")
        if value is not None and not isinstance(value, (np.ndarray, Tensor)):
            raise TypeError(f"register_buffer: {name!r} must be an array, a Tensor or None, "
                            f"not {type(value).__name__}")
        self._buffers[name] = value
        if persistent:
            self._persistent.add(name)
        else:
            self._persistent.discard(name)
        object.__setattr__(self, name, value)

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name} must be a Parameter, not {type(param).__name__}")
        if param is None:
            object.__setattr__(self, name, None)
            self._parameters.pop(name, None)
        else:
            self.__setattr__(name, param)

    def add_module(self, name, module):
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}.add_module: {name!r} must be a Module or None, "
                            f"not {type(module).__name__}")
        self.__setattr__(name, module)

    # --- traversal -------------------------------------------------------------------------------------

    def named_modules(self, prefix=""):
        """(dotted name, module) depth first in registration order (PyTorch's order), each module once."""
        stack = [(prefix, self)]
        seen = set()
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            children = [(f"{name}.{n}" if name else n, c) for n, c in mod._modules.items() if c is not None]
            stack.extend(reversed(children))

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        """(name, module) of each direct child, a module held under two names once (as in PyTorch)."""
        seen = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self):
        return (m for _, m in self.named_children())

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) for every parameter, each shared parameter once, in registration order."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, persistent_only=False):
        """(dotted name, buffer) for every buffer that is not None (as in PyTorch)."""
        for mod_name, mod in self.named_modules():
            for name, b in mod._buffers.items():
                if b is None or persistent_only and name not in mod._persistent:
                    continue
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def num_parameters(self):
        return sum(p.data.size for p in self.parameters())

    # --- modes and gradients ---------------------------------------------------------------------------

    def train(self, mode=True):
        if not isinstance(mode, (bool, np.bool_)):  # bool("False") is True
            raise ValueError(f"train: mode must be a bool, not {type(mode).__name__} {mode!r}")
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.data[...] = 0

    def apply(self, fn):
        """fn(m) for every module, each once, children before their parent (PyTorch's order)."""
        seen = set()

        def visit(m):
            seen.add(id(m))
            for child in m._modules.values():
                if id(child) not in seen:
                    visit(child)
            fn(m)

        visit(self)
        return self

    def to(self, dtype):
        """Cast every parameter and floating buffer to a floating dtype (float32 or float64), in place.

        Parameters and Tensor buffers are changed in place (an optimizer holds the parameters); array
        buffers are replaced.
        """
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Module.to: dtype must be floating point, not {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        for m in self.modules():
            for name, b in list(m._buffers.items()):
                if isinstance(b, Tensor) and b.data.dtype.kind == "f":
                    b.data = b.data.astype(dtype)
                    b.grad = None
                elif isinstance(b, np.ndarray) and b.dtype.kind == "f":
                    m.register_buffer(name, b.astype(dtype), name in m._persistent)
        return self

    # --- state -----------------------------------------------------------------------------------------

    def _parameter_places(self, prefix=""):
        """(dotted name, Parameter) for every place a parameter is registered: a shared (tied) one under each of
        its names, as PyTorch's state_dict keys it."""
        for name, p in self._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, child in self._modules.items():
            if child is not None:
                yield from child._parameter_places(f"{prefix}{name}.")

    def state_dict(self):
        """Name -> array copy, for every parameter (a tied one under each of its names) and persistent buffer."""
        out = OrderedDict()
        for name, p in self._parameter_places():
            out[name] = p.data.copy()
        for name, b in self.named_buffers(persistent_only=True):
            out[name] = np.array(b.data if isinstance(b, Tensor) else b, copy=True)
        return out

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters and buffers; every problem is named before anything changes.

        With strict=False, missing and unexpected names are skipped (and returned); shape and dtype
        mismatches are always errors.
        """
        own = OrderedDict(self._parameter_places())
        buffers = OrderedDict(self.named_buffers(persistent_only=True))
        targets = {**own, **buffers}
        given = {id(targets[k]) for k in state if k in targets}
        # a tied parameter found under one of its names is not missing under the others (a state that names
        # it once: distbp's own before it wrote every name)
        missing = [k for k in targets if k not in state and id(targets[k]) not in given]
        unexpected = [k for k in state if k not in targets]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unexpected:
                parts.append(f"unexpected {unexpected}")
            raise KeyError(f"load_state_dict for {type(self).__name__}: " + "; ".join(parts))
        staged = {}
        named_first = {}  # id of a parameter or buffer -> the first of its names in the state
        for name, value in state.items():
            if name not in targets:
                continue
            arr = np.asarray(value.data if isinstance(value, Tensor) else value)
            current = targets[name]
            cur = current.data if isinstance(current, Tensor) else np.asarray(current)
            if arr.shape != cur.shape:
                raise ValueError(f"load_state_dict: {name} has shape {arr.shape}, the model expects {cur.shape}")
            # converted to the model's dtype, as PyTorch copies (float64 arrays load into a float32 model, which
            # stays float32); a value that would lose its kind (float into int, complex into float) is refused
            if arr.dtype != cur.dtype and not np.can_cast(arr.dtype, cur.dtype, "same_kind"):
                raise TypeError(f"load_state_dict: {name} has dtype {arr.dtype}, the model expects {cur.dtype}")
            if not cur.flags.writeable:
                raise ValueError(f"load_state_dict: the model's {name} is read-only")
            other = named_first.setdefault(id(current), name)
            if other != name and not np.array_equal(staged[other], arr, equal_nan=True):
                raise ValueError(f"load_state_dict: {other} and {name} are one (tied) parameter, and the state "
                                 "gives them different values")
            staged[name] = arr
        for name, arr in staged.items():
            current = targets[name]
            if isinstance(current, Tensor):
                current.data[...] = arr
                current._bump_version()
            else:
                current[...] = arr
        return missing, unexpected

    # --- calling ---------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        return ""

    def __repr__(self):
        """PyTorch's layout: the options on one line with no children, else options and children one per line."""
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        lines += [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        if not self._modules and len(lines) == 1:
            return f"{type(self).__name__}({lines[0]})"
        return f"{type(self).__name__}(" + "".join(f"\n  {line}" for line in lines) + ("\n)" if lines else ")")
