"""The standard layers, each a thin Module over one or two autograd ops."""

import numpy as np

from ..autograd import ops
from . import init
from .module import Module, Parameter


def _size(value, name, minimum):
    """A layer size as an int (numpy integers too), checked against its minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features). A size may be 0, as in PyTorch."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        in_features = _size(in_features, "Linear: in_features", 0)
        out_features = _size(out_features, "Linear: out_features", 0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype), dtype=dtype)
        self.bias = Parameter(np.empty(out_features, dtype), dtype=dtype) if bias else None
        init.default_layer_init_(self.weight, self.bias)

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=np.float32):
        super().__init__()
        in_channels = _size(in_channels, "Conv2d: in_channels", 1)
        out_channels = _size(out_channels, "Conv2d: out_channels", 1)
        try:
            if stride is None:  # pooling's "the kernel's"; a convolution's stride is given or 1
                raise ValueError("stride must be an int or a pair of ints, not None")
            (kh, kw), _, _ = ops._window(kernel_size, stride, padding)
        except ValueError as e:
            raise ValueError(f"Conv2d: {e}") from None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.weight = Parameter(np.empty((out_channels, in_channels, kh, kw), dtype), dtype=dtype)
        self.bias = Parameter(np.empty(out_channels, dtype), dtype=dtype) if bias else None
        init.default_layer_init_(self.weight, self.bias)

    def forward(self, x):
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        # stride None: the kernel size, as in PyTorch, which shows it so
        self.kernel_size, self.padding = kernel_size, padding
        self.stride = kernel_size if stride is None else stride

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return ops.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class Flatten(Module):
    """Collapse every axis from start_axis on into one (the batch axis stays)."""

    def __init__(self, start_axis=1):
        super().__init__()
        self.start_axis = start_axis

    def forward(self, x):
        return x.flatten(self.start_axis)


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return ops.sigmoid(x)


class Identity(Module):
    def forward(self, x):
        return x


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype=np.float32):
        super().__init__()
        self.normalized_shape = ((int(normalized_shape),) if isinstance(normalized_shape, (int, np.integer))
                                 else tuple(normalized_shape))
        self.eps = eps
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype), dtype=dtype)
            self.bias = Parameter(np.zeros(self.normalized_shape, dtype), dtype=dtype)
        else:
            self.weight = self.bias = None

    def forward(self, x):
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, dtype=np.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(np.empty((num_embeddings, embedding_dim), dtype), dtype=dtype)
        init.normal_(self.weight)

    def forward(self, indices):
        return ops.embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Dropout(Module):
    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class ModuleList(Module):
    """Modules held in order, registered as children named 0, 1, 2, ..."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):  # None too: it would register nothing and leave no entry
            raise TypeError(f"{type(self).__name__}: item {len(self)} must be a Module, not {type(module).__name__}")
        n = len(self._modules)
        while str(n) in self._modules:  # a slice of a Sequential keeps its names: never replace one
            n += 1
        self.add_module(str(n), module)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ModuleList(list(self)[i])  # renumbered, as in PyTorch
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__(modules)

    def __getitem__(self, i):
        if isinstance(i, slice):  # the layers keep their names, as in PyTorch: a state_dict means the same
            part = Sequential()
            for name, module in list(self._modules.items())[i]:
                part.add_module(name, module)
            return part
        return super().__getitem__(i)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class CrossEntropyLoss(Module):
    def __init__(self, reduction="mean", ignore_index=-100):
        super().__init__()
        ops.check_reduction("CrossEntropyLoss", reduction)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, logits, target):
        return ops.cross_entropy(logits, target, self.reduction, self.ignore_index)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class MSELoss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        ops.check_reduction("MSELoss", reduction)
        self.reduction = reduction

    def forward(self, x, y):
        return ops.mse_loss(x, y, self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
