"""The models `distbp train` builds by name: mlp, cnn and charlm (a small GPT-style character model)."""

import math

import numpy as np

from . import nn
from .autograd import Tensor, no_grad
from .autograd.random import default_rng


def mlp(input_shape, num_classes, hidden=(128,)):
    """Flatten, then Linear + ReLU per hidden width, then a Linear classifier."""
    width = int(np.prod(input_shape))
    layers = [nn.Flatten()] if len(input_shape) > 1 else []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape, num_classes, channels=(32, 64), hidden=128):
    """Conv 3x3 + ReLU blocks, each halving the image with 2x2 max pooling, then two Linear layers."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    layers = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if h >= 4 and w >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class CharLM(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocab_size, block_size, d_model=64, n_layers=2, n_heads=4, dropout=0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("d_model", d_model),
                            ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"CharLM: {name} must be an integer >= 1, got {value!r}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        for emb in (self.token, self.position):
            nn.init.normal_(emb.weight, std=0.02)
        self.blocks = nn.ModuleList(nn.TransformerBlock(d_model, n_heads, dropout=dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, codes):
        codes = codes.data if isinstance(codes, Tensor) else np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"CharLM: expected (batch, time) integer codes, got shape {codes.shape}")
        t = codes.shape[1]
        if t > self.block_size:
            raise ValueError(f"CharLM: sequence of {t} is longer than block_size={self.block_size}")
        x = self.token(codes) + self.position(np.arange(t))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def generate(self, prompt, length, temperature=1.0, rng=None):
        """Sample `length` codes after `prompt` (a 1-d sequence of codes); returns exactly those codes.

        temperature 0 is greedy. An empty prompt starts from code 0 (the model needs one position to
        predict from), which is not returned. rng defaults to distbp's generator (see manual_seed).
        """
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"CharLM.generate: temperature must be finite and >= 0, got {temperature}")
        if length < 0:
            raise ValueError(f"CharLM.generate: length must be >= 0, got {length}")
        rng = default_rng() if rng is None else rng
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or (prompt.size and prompt.dtype.kind not in "iu"):
            raise ValueError(f"CharLM.generate: the prompt must be a 1-d sequence of integer codes, got {prompt!r}")
        codes = [int(c) for c in prompt] or [0]
        start = len(codes)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(length):
                    window = np.asarray(codes[-self.block_size:])[None]
                    logits = self(window).data[0, -1]
                    with np.errstate(over="ignore", divide="ignore"):
                        scaled = logits.astype(np.float64) / temperature if temperature else None
                    if scaled is None or not np.isfinite(scaled).all():
                        # greedy: the first of the largest (at temperature 0, and at one so small that the
                        # logits over it overflow; a floor of 1e-6 still sampled among near-ties)
                        codes.append(int(np.argmax(logits)))
                        continue
                    p = np.exp(scaled - scaled.max())
                    codes.append(int(rng.choice(len(p), p=p / p.sum())))
        finally:
            self.train(was_training)
        return codes[start:]


def charlm(vocab_size, block_size, d_model=64, n_layers=2, n_heads=4, dropout=0.0):
    return CharLM(vocab_size, block_size, d_model, n_layers, n_heads, dropout)


MODELS = ("mlp", "cnn", "charlm")
