"""Tensor: an n-dimensional float32 array that remembers how it was computed.

A Tensor wraps one `np.ndarray` (`.data`). Floating-point data is float32 unless float64 is asked for
explicitly (gradient checks); integer and boolean tensors carry indices and masks and never need a
gradient. Arithmetic on tensors goes through the primitive ops in `ops.py`, which record graph nodes
when an input requires a gradient.
"""

import weakref

import numpy as np

from . import function
from .grad_mode import state

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _to_array(data, dtype):
    """The array a Tensor holds: float32 for floating input unless `dtype` says otherwise."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        dtype = np.dtype(dtype)
        arr = np.asarray(data, dtype=dtype)
    else:
        arr = np.asarray(data)
        kind = arr.dtype.kind
        if kind == "f" and arr.dtype != np.float32:
            # float64 (numpy's default) is the silent 2x slowdown: floats become float32 unless asked.
            arr = arr.astype(np.float32)
        elif kind in "iu" and arr.dtype != np.int64:
            arr = arr.astype(np.int64)
        elif kind not in "fiub":
            raise TypeError(f"cannot make a Tensor from data of dtype {arr.dtype}")
    return arr


class Tensor:
    """An array with an optional gradient and, when computed from tensors that require one, a graph node.

    Tensor(data, requires_grad=False, dtype=None): floating data becomes float32 unless `dtype` is
    given (np.float64 for gradient checks); integers become int64; booleans stay bool.
    """

    # _version: None until the data is first changed in place or shared (detach, a view op), then a one-item
    # list shared by every tensor over that memory; backward compares it with what each op saved.
    __slots__ = ("data", "requires_grad", "grad", "_node", "_hooks", "_post_hooks", "_grad_dest", "_version",
                 "__weakref__")

    _is_node = False
    __hash__ = object.__hash__  # identity: the engine keys leaves by object, and == is elementwise
    __array_ufunc__ = None  # ndarray (op) Tensor defers to Tensor's reflected operators

    def __init__(self, data, requires_grad=False, dtype=None):
        arr = _to_array(data, dtype)
        self.data = arr
        self.grad = None
        self._node = None
        self._hooks = None
        self._post_hooks = None
        self._grad_dest = None
        self._version = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _from_op(cls, data, node):
        t = object.__new__(Tensor)
        t.data = data
        t.grad = None
        t._node = node
        t._hooks = None
        t._post_hooks = None
        t._grad_dest = None
        t._version = None
        t.requires_grad = node is not None
        return t

    # --- in-place changes ------------------------------------------------------------------------------

    def _shared_version(self):
        """The version counter, made now if this tensor never had one, for another tensor over the same data."""
        if self._version is None:
            self._version = [0]
        return self._version

    def _bump_version(self):
        """Record an in-place change of the data: a graph that saved this tensor can no longer use it."""
        if self._version is None:
            self._version = [1]
        else:
            self._version[0] += 1

    # --- basic properties ----------------------------------------------------------------------------

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def is_leaf(self):
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

    def __len__(self):
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def __repr__(self):
        body = np.array2string(self.data, precision=4, separator=", ", prefix="Tensor(")
        extra = ""
        if self.data.dtype != np.float32:
            extra += f", dtype={self.data.dtype}"
        if self._node is not None:
            extra += f", grad_fn={self._node.name}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"Tensor({body}{extra})"

    def __array__(self, dtype=None, copy=None):
        if dtype is not None and dtype != self.data.dtype:
            return self.data.astype(dtype)
        return self.data.copy() if copy else self.data

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.data.shape} is ambiguous")
        return bool(self.data)

    # --- leaving the graph -----------------------------------------------------------------------------

    def numpy(self):
        """The underlying array (shared, not copied); detached from any graph."""
        return self.data

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.data.shape}")
        return self.data.item()

    def tolist(self):
        return self.data.tolist()

    def detach(self):
        """The same data as a new leaf that requires no gradient (an in-place change to it counts for both)."""
        t = Tensor._from_op(self.data, None)
        t._version = self._shared_version()
        return t

    def requires_grad_(self, flag=True):
        if self._node is not None and not flag:
            raise RuntimeError("requires_grad can only be switched off on a leaf; use detach()")
        if flag and self.data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"only floating-point tensors can require gradients, not {self.data.dtype}")
        self.requires_grad = bool(flag)
        return self

    # --- gradients -------------------------------------------------------------------------------------

    def backward(self, grad=None, retain_graph=False, create_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` (weighted by `grad` if self isn't scalar)."""
        from .engine import backward

        backward([self], None if grad is None else [grad], retain_graph, create_graph)

    def register_hook(self, hook):
        """hook(grad) -> grad or None, called with this tensor's gradient before it flows on.

        The gradient is an ndarray (a Tensor during a create_graph backward); a returned value replaces it.
        Returns a handle whose remove() unregisters the hook.
        """
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._node is None:
            if self._hooks is None:
                self._hooks = []
            hooks = self._hooks
        else:
            if self._node.hooks is None:
                self._node.hooks = []
            hooks = self._node.hooks
        hooks.append(hook)
        return _HookHandle(hooks, hook)

    def register_post_accumulate_grad_hook(self, hook):
        """hook(tensor), called on a leaf as soon as its `.grad` for the running backward is final.

        Data parallelism uses it to start reducing a gradient while backward is still running.
        """
        if self._node is not None:
            raise RuntimeError("post-accumulate-grad hooks are for leaf tensors only")
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._post_hooks is None:
            self._post_hooks = []
        self._post_hooks.append(hook)
        return _HookHandle(self._post_hooks, hook)

    def set_grad_destination(self, array):
        """Write this leaf's gradient into `array` (same shape and dtype, C-contiguous), or stop (None).

        A backward that starts the gradient afresh (`.grad` is None) offers `array` to the op that computes
        it; an op that can write its result there does (Linear, matmul by a matrix, ...), and `.grad` then holds a
        Tensor over `array` itself, with no copy. Otherwise `.grad` is a new array, as without a
        destination. Data parallelism points each parameter at its slice of a flat all-reduce bucket.
        """
        if self._node is not None:
            raise RuntimeError("a gradient destination is for leaf tensors only")
        if array is not None:
            if not isinstance(array, np.ndarray):
                raise TypeError(f"gradient destination: expected a numpy array, got {type(array).__name__}")
            if array.shape != self.data.shape or array.dtype != self.data.dtype:
                raise ValueError(
                    f"gradient destination: the array is {array.dtype}{list(array.shape)} but the tensor is "
                    f"{self.data.dtype}{list(self.data.shape)}"
                )
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError("gradient destination: the array must be C-contiguous and writeable")
            if np.shares_memory(array, self.data):
                raise ValueError("gradient destination: the array overlaps the tensor's own data")
        self._grad_dest = array

    def retain_grad(self):
        """Keep this non-leaf tensor's gradient in `.grad` after backward."""
        if self._node is None:
            return
        ref = weakref.ref(self)

        def keep(g):
            t = ref()
            if t is not None:
                g_t = g if isinstance(g, Tensor) else Tensor._from_op(g, None)
                t.grad = g_t if t.grad is None else t.grad + g_t
            return None

        self.register_hook(keep)

    # --- casting ---------------------------------------------------------------------------------------

    def astype(self, dtype):
        """A differentiable cast (float32 <-> float64)."""
        return _ops.cast(self, dtype)

    def float(self):
        return _ops.cast(self, np.float32)

    def double(self):
        return _ops.cast(self, np.float64)

    # --- operators -------------------------------------------------------------------------------------

    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __pow__(self, other):
        return _ops.pow(self, other)

    def __rpow__(self, other):
        return _ops.pow(other, self)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __neg__(self):
        return _ops.neg(self)

    def __pos__(self):
        return self

    def __abs__(self):
        return _ops.abs(self)

    def __getitem__(self, index):
        return _ops.getitem(self, index)

    def __setitem__(self, index, value):
        if self.requires_grad and state.enabled:
            raise RuntimeError(
                "in-place assignment into a tensor that requires grad would corrupt its graph; "
                "assign under no_grad() or into .data"
            )
        if isinstance(value, Tensor) and value.requires_grad and state.enabled:
            raise RuntimeError(
                "assigning a tensor that requires grad into another would drop its gradient (assignment "
                "records no graph): build the result with ops.where, concatenate, stack or pad instead, or "
                "assign value.detach() if no gradient should flow"
            )
        self.data[index] = value.data if isinstance(value, Tensor) else value
        self._bump_version()

    # x += y and friends change x's data in place, as in PyTorch, when no gradient is involved (an optimizer
    # update under no_grad). When one is (grad mode on, x or y requires grad), the result is a new tensor and
    # the name is rebound: differentiable, but other references to x keep the old value. A leaf that
    # requires grad is refused, as in PyTorch: its gradient would describe a tensor that no longer exists.
    def _in_place(self, other, op, ufunc, symbol):
        if state.enabled and (self.requires_grad or (isinstance(other, Tensor) and other.requires_grad)):
            if self.requires_grad and self._node is None:
                raise RuntimeError(
                    f"x {symbol}= ... on a leaf tensor that requires grad, with grad mode on: do it under "
                    f"no_grad() (an optimizer update) or write x = x {symbol} ... (a new tensor)"
                )
            result = op(self, other)
            if result.data.shape != self.data.shape or result.data.dtype != self.data.dtype:
                raise RuntimeError(
                    f"x {symbol}= ...: the result is {result.data.dtype}{list(result.data.shape)}, but x is "
                    f"{self.data.dtype}{list(self.data.shape)}: an in-place operation keeps x's shape and dtype"
                )
            return result
        raw = other.data if isinstance(other, Tensor) else other
        try:
            ufunc(self.data, raw, out=self.data, casting="same_kind")
        except TypeError:
            result = np.result_type(self.data, raw)
            raise TypeError(
                f"x {symbol}= ...: the result is {result}, which cannot be stored in place in a {self.data.dtype} "
                "tensor"
            ) from None
        except ValueError as e:
            raise ValueError(
                f"x {symbol}= ...: a tensor of shape {self.data.shape} cannot take the result in place "
                f"({np.shape(raw)} operand): {e}"
            ) from None
        self._bump_version()
        return self

    def __iadd__(self, other):
        return self._in_place(other, _ops.add, np.add, "+")

    def __isub__(self, other):
        return self._in_place(other, _ops.sub, np.subtract, "-")

    def __imul__(self, other):
        return self._in_place(other, _ops.mul, np.multiply, "*")

    def __itruediv__(self, other):
        return self._in_place(other, _ops.div, np.true_divide, "/")

    # comparisons: no gradient, boolean results
    def __lt__(self, other):
        return Tensor._from_op(self.data < _raw(other), None)

    def __le__(self, other):
        return Tensor._from_op(self.data <= _raw(other), None)

    def __gt__(self, other):
        return Tensor._from_op(self.data > _raw(other), None)

    def __ge__(self, other):
        return Tensor._from_op(self.data >= _raw(other), None)

    def __eq__(self, other):
        return Tensor._from_op(np.asarray(self.data == _raw(other)), None)

    def __ne__(self, other):
        return Tensor._from_op(np.asarray(self.data != _raw(other)), None)

    # --- methods that are ops --------------------------------------------------------------------------

    def sum(self, axis=None, keepdims=False):
        return _ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops.mean(self, axis, keepdims)

    def var(self, axis=None, keepdims=False, correction=0):
        return _ops.var(self, axis, keepdims, correction)

    def max(self, axis=None, keepdims=False):
        return _ops.max(self, axis, keepdims)

    def min(self, axis=None, keepdims=False):
        return _ops.min(self, axis, keepdims)

    def argmax(self, axis=None):
        return Tensor._from_op(np.asarray(self.data.argmax(axis)), None)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    def flatten(self, start_axis=0):
        shape = self.data.shape
        (start,) = _ops._axes(start_axis, len(shape))
        return _ops.reshape(self, shape[:start] + (int(np.prod(shape[start:])),))

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _ops.transpose(self, axes or None)

    permute = transpose

    def swapaxes(self, a, b):
        return _ops.swapaxes(self, a, b)

    @property
    def T(self):
        return _ops.transpose(self, None)

    def squeeze(self, axis=None):
        return _ops.squeeze(self, axis)

    def unsqueeze(self, axis):
        return _ops.unsqueeze(self, axis)

    def broadcast_to(self, shape):
        return _ops.broadcast_to(self, shape)

    def exp(self):
        return _ops.exp(self)

    def log(self):
        return _ops.log(self)

    def sqrt(self):
        return _ops.sqrt(self)

    def tanh(self):
        return _ops.tanh(self)

    def sigmoid(self):
        return _ops.sigmoid(self)

    def relu(self):
        return _ops.relu(self)

    def abs(self):
        return _ops.abs(self)

    def clip(self, lo=None, hi=None):
        return _ops.clip(self, lo, hi)

    def softmax(self, axis=-1):
        return _ops.softmax(self, axis)

    def log_softmax(self, axis=-1):
        return _ops.log_softmax(self, axis)

    def matmul(self, other):
        return _ops.matmul(self, other)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


class _HookHandle:
    def __init__(self, hooks, hook):
        self._hooks = hooks
        self._hook = hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def tensor(data, requires_grad=False, dtype=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def zeros(*shape, dtype=np.float32, requires_grad=False):
    return Tensor(np.zeros(_shape(shape), dtype=dtype), requires_grad=requires_grad, dtype=dtype)


def ones(*shape, dtype=np.float32, requires_grad=False):
    return Tensor(np.ones(_shape(shape), dtype=dtype), requires_grad=requires_grad, dtype=dtype)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


function._bind_tensor(Tensor)

from . import ops as _ops  # noqa: E402  (ops needs Tensor defined first)
