"""Weight initialisations, in place, drawing from distbp's seeded generator (or a given one)."""

import math
import numbers
import warnings

from ..autograd.grad_mode import no_grad
from ..autograd.random import default_rng


def _fans(shape):
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a tensor of 2 or more dimensions, got shape {shape}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity, param=None):
    gains = {"linear": 1.0, "sigmoid": 1.0, "conv2d": 1.0, "tanh": 5 / 3, "relu": math.sqrt(2.0)}
    if nonlinearity == "leaky_relu":
        if param is not None and (isinstance(param, bool) or not isinstance(param, numbers.Real)):
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a number")
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity not in gains:
        raise ValueError(f"calculate_gain: unknown nonlinearity {nonlinearity!r}")
    return gains[nonlinearity]


def _fill(tensor, values):
    with no_grad():
        tensor.data[...] = values.astype(tensor.data.dtype, copy=False)
    tensor._bump_version()  # a graph that saved the old values can no longer use them
    return tensor


def uniform_(tensor, a=0.0, b=1.0, rng=None):
    return _fill(tensor, (rng or default_rng()).uniform(a, b, tensor.data.shape))


def normal_(tensor, mean=0.0, std=1.0, rng=None):
    return _fill(tensor, (rng or default_rng()).normal(mean, std, tensor.data.shape))


def constant_(tensor, value):
    tensor.data[...] = value
    tensor._bump_version()
    return tensor


def zeros_(tensor):
    return constant_(tensor, 0)


def ones_(tensor):
    return constant_(tensor, 1)


def _is_empty(tensor):
    """A tensor with no elements has no fan to scale by: initialising it is a no-op, with PyTorch's warning."""
    if tensor.data.size:
        return False
    warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
    return True


def xavier_uniform_(tensor, gain=1.0, rng=None):
    if _is_empty(tensor):
        return tensor
    fan_in, fan_out = _fans(tensor.data.shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, rng)


def xavier_normal_(tensor, gain=1.0, rng=None):
    if _is_empty(tensor):
        return tensor
    fan_in, fan_out = _fans(tensor.data.shape)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def _kaiming_std(tensor, a, mode, nonlinearity):
    fan_in, fan_out = _fans(tensor.data.shape)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"kaiming init: mode must be 'fan_in' or 'fan_out', not {mode!r}")
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    if _is_empty(tensor):
        return tensor
    bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
    return uniform_(tensor, -bound, bound, rng)


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    if _is_empty(tensor):
        return tensor
    return normal_(tensor, 0.0, _kaiming_std(tensor, a, mode, nonlinearity), rng)


def default_layer_init_(weight, bias=None, rng=None):
    """PyTorch's Linear/Conv default: kaiming_uniform(a=sqrt(5)) weights, U(+-1/sqrt(fan_in)) bias."""
    kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in, _ = _fans(weight.data.shape)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        uniform_(bias, -bound, bound, rng)
