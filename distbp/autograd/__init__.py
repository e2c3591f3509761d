"""The numpy autograd core: Tensor, the backward engine, the primitive ops and gradcheck."""

from . import ops
from .engine import backward, grad
from .function import Function
from .gradcheck import GradcheckError, gradcheck, gradgradcheck
from .grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .random import check_rng_state, default_rng, get_rng_state, manual_seed, set_rng_state
from .tensor import Tensor, ones, tensor, zeros

__all__ = [
    "Tensor", "tensor", "zeros", "ones", "Function", "ops", "backward", "grad",
    "no_grad", "enable_grad", "is_grad_enabled", "set_grad_enabled",
    "gradcheck", "gradgradcheck", "GradcheckError",
    "manual_seed", "default_rng", "get_rng_state", "set_rng_state", "check_rng_state",
]
