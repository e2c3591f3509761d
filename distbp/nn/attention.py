"""Multi-head causal self-attention and the pre-norm transformer block built on it (GPT-style)."""

import math

import numpy as np

from ..autograd import ops
from .layers import GELU, Dropout, LayerNorm, Linear
from .module import Module


class CausalSelfAttention(Module):
    """Each position attends to itself and earlier positions only, over n_heads heads of d_model/n_heads."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        if isinstance(n_heads, bool) or not isinstance(n_heads, (int, np.integer)) or n_heads < 1:
            raise ValueError(f"CausalSelfAttention: n_heads must be an integer >= 1, got {n_heads!r}")
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.qkv = Linear(d_model, 3 * d_model)
        self.proj = Linear(d_model, d_model)
        self.attn_dropout = Dropout(dropout)
        self.resid_dropout = Dropout(dropout)
        self._masks = {}

    def _mask(self, t):
        mask = self._masks.get(t)
        if mask is None:
            mask = self._masks[t] = np.tril(np.ones((t, t), dtype=bool))
        return mask

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"CausalSelfAttention: expected input (batch, time, {self.d_model}), got {x.shape}")
        b, t, c = x.shape
        h = self.n_heads
        d = c // h
        qkv = self.qkv(x).reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)  # (3, b, h, t, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.swapaxes(-1, -2)
        weights = self.attn_dropout(ops.softmax(scores, -1, scale=1 / math.sqrt(d), mask=self._mask(t)))
        y = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
        return self.resid_dropout(self.proj(y))

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}"


class MLP(Module):
    def __init__(self, d_model, hidden, dropout=0.0):
        super().__init__()
        self.fc = Linear(d_model, hidden)
        self.act = GELU(approximate="tanh")  # GPT-2's choice, and several times cheaper than erf
        self.proj = Linear(hidden, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))


class TransformerBlock(Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model, n_heads, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.ln1 = LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))
