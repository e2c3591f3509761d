"""The functional forms of the layers (as torch.nn.functional), all defined in distbp.autograd.ops."""

from ..autograd.ops import (  # noqa: F401
    avg_pool2d, conv2d, cross_entropy, dropout, embedding, gelu, layer_norm, linear, log_softmax,
    max_pool2d, mse_loss, pad, relu, sigmoid, softmax, tanh, unfold,
)
