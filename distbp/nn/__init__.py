"""Layers, losses and initialisation on top of the autograd core, with a PyTorch-shaped API."""

from . import functional, init, utils
from .attention import MLP, CausalSelfAttention, TransformerBlock
from .layers import (
    GELU, AvgPool2d, Conv2d, CrossEntropyLoss, Dropout, Embedding, Flatten, Identity, LayerNorm, Linear,
    MaxPool2d, ModuleList, MSELoss, ReLU, Sequential, Sigmoid, Tanh,
)
from .module import Module, Parameter
from .utils import clip_grad_norm_
