"""distbp: data-parallel training on a numpy autograd core."""

from .autograd import (
    Tensor, enable_grad, grad, manual_seed, no_grad, ones, tensor, zeros,
)
from .autograd.ops import (
    abs, clip, concatenate, exp, gather, log, matmul, maximum, mean, minimum, pad, relu, reshape,
    sigmoid, sqrt, stack, sum, tanh, transpose, where,
)

__version__ = "0.1.0"
