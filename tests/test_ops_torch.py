"""Every op in distbp.autograd.ops against PyTorch: forward values, gradients and dtypes.

Each case runs one op in distbp and its PyTorch equivalent on the same random inputs, backpropagates the
same random upstream gradient through both, and compares the output and every input's gradient:
  - float32 inputs: rtol = atol = 1e-5 unless a case says otherwise (and why);
  - float64 inputs: rtol 1e-9, atol 1e-10 (a float32 intermediate anywhere would show up here);
  - dtypes: float32 in gives float32 out and float32 gradients, float64 likewise.

Conventions mapped to PyTorch's: cross_entropy takes classes on the LAST axis (torch: axis 1), var's
`correction` defaults to 0 (numpy), pad takes numpy's per-axis (before, after) pairs (torch: flat, last
axis first), conv2d/pooling are NCHW as in torch, avg_pool2d counts padding (count_include_pad=True).
"""

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

from distbp import Tensor
from distbp.autograd import grad, ops

torch = pytest.importorskip("torch", reason="PyTorch is the test oracle; install with pip install -e '.[test]'")
F = torch.nn.functional

RTOL = ATOL = 1e-5
RTOL64, ATOL64 = 1e-9, 1e-10
# Contractions (matmul, linear, conv2d) only: numpy's BLAS and torch's GEMM/convolution kernels add the
# products in different orders (blocking, FMA, threads), and the weight gradients sum up to a few hundred
# float32 products of O(10) magnitude, so results differ by a few ulp of O(10), i.e. ~1e-5 absolute.
# (Measured here: conv2d uses a third of a 1e-5 budget; the slack covers other BLAS builds and thread
# counts.) Plain reductions (sum/mean/var/mse/layer_norm) match within 1e-5 and keep it.
ATOL_SUM = 1e-4


# --- input makers: rng -> float64 array (cast to the test's dtype afterwards) -----------------------


def N(*shape, scale=1.0):
    return lambda rng: rng.standard_normal(shape) * scale


def P(*shape, lo=0.5, hi=2.0):
    return lambda rng: rng.uniform(lo, hi, shape)


def Z(*shape):
    """Normal values with every third element exactly 0 (relu/abs at the kink: torch's subgradient is 0)."""

    def make(rng):
        x = rng.standard_normal(shape)
        x.reshape(-1)[::3] = 0.0
        return x

    return make


def Q(*shape, step=0.25, lo=-4, hi=4):
    """Values on a coarse grid, exactly representable in float32: exact ties and exact clip bounds."""
    return lambda rng: rng.integers(lo, hi + 1, shape) * step


# --- the cases ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    inputs: tuple  # makers of the differentiable inputs
    d: Callable  # distbp: fn(*Tensors) -> Tensor
    t: Callable  # torch: fn(*torch tensors) -> torch tensor
    rtol: float = RTOL
    atol: float = ATOL
    out_dtype: Any = None  # None: the inputs' dtype
    xfail: Any = None  # a known distbp bug: a Bug (below), naming the tests it breaks


CASES = []


def add(id, inputs, d, t, **kw):
    CASES.append(Case(id, tuple(inputs), d, t, **kw))


@dataclasses.dataclass(frozen=True)
class Bug:
    """A known distbp bug: which tests it breaks ('values-float32', 'values-float64', 'dtype-float32',
    'dtype-float64'), how (the exception, AssertionError for a wrong result), and why."""

    raises: type
    reason: str
    breaks: frozenset = frozenset({"values-float32", "values-float64", "dtype-float32", "dtype-float64"})




def T(a):
    return torch.from_numpy(np.asarray(a))


# elementwise binary, with broadcasting
BINARY_SHAPES = [
    ("same", (8, 16), (8, 16)),
    ("bcast-615-516", (6, 1, 16), (5, 16)),
    ("bcast-16-81", (16,), (8, 1)),
    ("scalar-rhs", (8, 16), ()),
    ("scalar-lhs", (), (8, 16)),
    ("keepdim-1", (8, 1), (1, 16)),
]
for name, sa, sb in BINARY_SHAPES:
    add(f"add-{name}", [N(*sa), N(*sb)], ops.add, torch.add)
    add(f"sub-{name}", [N(*sa), N(*sb)], ops.sub, torch.sub)
    add(f"mul-{name}", [N(*sa), N(*sb)], ops.mul, torch.mul)
    add(f"div-{name}", [N(*sa), P(*sb)], ops.div, torch.div)
    add(f"pow-{name}", [P(*sa), N(*sb)], ops.pow, torch.pow)
    add(f"maximum-{name}", [N(*sa), N(*sb)], ops.maximum, torch.maximum)
    add(f"minimum-{name}", [N(*sa), N(*sb)], ops.minimum, torch.minimum)
    shape = np.broadcast_shapes(sa, sb)
    cond = np.random.default_rng(5).random(shape) < 0.4
    add(f"where-{name}", [N(*sa), N(*sb)], lambda a, b, c=cond: ops.where(c, a, b),
        lambda a, b, c=cond: torch.where(T(c), a, b))

# ties: both split the gradient half and half where a == b
add("maximum-ties", [Q(8, 16, lo=-2, hi=2), Q(8, 16, lo=-2, hi=2)], ops.maximum, torch.maximum)
add("minimum-ties", [Q(8, 16, lo=-2, hi=2), Q(16, lo=-2, hi=2)], ops.minimum, torch.minimum)

# python and numpy scalar operands
add("add-python-scalar", [N(8, 16)], lambda x: x + 2.5, lambda x: x + 2.5)
add("rsub-python-scalar", [N(8, 16)], lambda x: 1.5 - x, lambda x: 1.5 - x)
add("mul-python-int", [N(8, 16)], lambda x: ops.mul(x, -3), lambda x: x * -3)
add("rdiv-python-scalar", [P(8, 16)], lambda x: 2.0 / x, lambda x: 2.0 / x)
add("mul-np-float64-scalar", [N(8, 16)], lambda x: x * np.float64(0.5), lambda x: x * 0.5)
add("add-np-float64-array", [N(8, 16)], lambda x: x + np.linspace(-1, 1, 16), lambda x: x + T(np.linspace(-1, 1, 16)).to(x.dtype))
add("pow-2", [N(8, 16)], lambda x: x ** 2, lambda x: x ** 2)
add("pow-3", [N(8, 16)], lambda x: ops.pow(x, 3), lambda x: x ** 3)
add("pow-0.5", [P(8, 16)], lambda x: ops.pow(x, 0.5), lambda x: x ** 0.5)
add("pow-neg1.5", [P(8, 16)], lambda x: ops.pow(x, -1.5), lambda x: x ** -1.5)
add("pow-0-with-zeros", [Z(8, 16)], lambda x: ops.pow(x, 0) * x, lambda x: x ** 0 * x)
add("pow-np-float64-exponent", [P(8, 16)], lambda x: ops.pow(x, np.float64(1.5)), lambda x: x ** 1.5)
add("rpow-python-base", [N(8, 16)], lambda x: 2.0 ** x, lambda x: 2.0 ** x)
add("maximum-python-scalar", [N(8, 16)], lambda x: ops.maximum(x, 0.1), lambda x: torch.clamp(x, min=0.1))
add("where-python-scalar", [N(8, 16)], lambda x: ops.where(np.eye(8, 16, dtype=bool), x, 0.5),
    lambda x: torch.where(T(np.eye(8, 16, dtype=bool)), x, 0.5))

# elementwise unary
add("neg", [N(8, 16)], ops.neg, torch.neg)
add("exp", [N(8, 16)], ops.exp, torch.exp)
add("log", [P(8, 16, lo=0.1, hi=5.0)], ops.log, torch.log)
add("sqrt", [P(8, 16, lo=0.1, hi=5.0)], ops.sqrt, torch.sqrt)
add("tanh", [N(8, 16, scale=2)], ops.tanh, torch.tanh)
add("sigmoid", [N(8, 16, scale=3)], ops.sigmoid, torch.sigmoid)
add("sigmoid-extreme", [N(8, 16, scale=40)], ops.sigmoid, torch.sigmoid)
add("relu", [N(8, 16)], ops.relu, torch.relu)
add("relu-exact-zeros", [Z(8, 16)], ops.relu, torch.relu)
add("gelu-none", [N(8, 16, scale=2)], lambda x: ops.gelu(x), lambda x: F.gelu(x, approximate="none"))
add("gelu-tanh", [N(8, 16, scale=2)], lambda x: ops.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"))
add("erf", [N(8, 16)], ops.erf, torch.erf)
add("abs", [N(8, 16)], ops.abs, torch.abs)
add("abs-exact-zeros", [Z(8, 16)], ops.abs, torch.abs)
# grid values hit the bounds exactly: both pass the gradient through at x == bound
add("clip-both", [Q(8, 16)], lambda x: ops.clip(x, -0.5, 0.75), lambda x: torch.clamp(x, -0.5, 0.75))
add("clip-lo", [Q(8, 16)], lambda x: ops.clip(x, lo=-0.5), lambda x: torch.clamp(x, min=-0.5))
add("clip-hi", [Q(8, 16)], lambda x: ops.clip(x, hi=0.75), lambda x: torch.clamp(x, max=0.75))
add("clip-method", [N(8, 16)], lambda x: x.clip(-1.0, 1.0), lambda x: x.clip(-1.0, 1.0))
add("clip-np-float64-bounds", [N(8, 16)], lambda x: ops.clip(x, np.float64(-0.5), np.float64(0.5)),
    lambda x: torch.clamp(x, -0.5, 0.5))
add("clip-0d-array-bounds", [N(8, 16)], lambda x: ops.clip(x, np.array(-0.5), np.array(0.5)),
    lambda x: torch.clamp(x, -0.5, 0.5))  # a 0-d float64 array promoted the result to float64
add("mean-over-a-full-axis-of-an-empty-batch", [N(0, 5)], lambda x: ops.mean(x, 1), lambda x: torch.mean(x, 1))
add("max-over-a-full-axis-of-an-empty-batch", [N(0, 5)], lambda x: ops.max(x, np.int64(1)),
    lambda x: torch.amax(x, 1))
add("cast-to-float64", [N(8, 16)], lambda x: ops.cast(x, np.float64) * 3.0, lambda x: x.double() * 3.0,
    out_dtype=np.float64)
add("cast-to-float32", [N(8, 16)], lambda x: ops.cast(x, np.float32) * 3.0, lambda x: x.float() * 3.0,
    out_dtype=np.float32)

# reductions
RED_AXES = [
    ("all", None, False),
    ("all-keep", None, True),
    ("ax0", 0, False),
    ("ax-1-keep", -1, True),
    ("ax02", (0, 2), False),
    ("ax12-keep", (1, 2), True),
]


def dims(axis, ndim):
    return tuple(range(ndim)) if axis is None else axis


for name, axis, keep in RED_AXES:
    add(f"sum-{name}", [N(6, 7, 8)], lambda x, a=axis, k=keep: ops.sum(x, a, k),
        lambda x, a=axis, k=keep: torch.sum(x, dims(a, 3), keepdim=k))
    add(f"mean-{name}", [N(6, 7, 8)], lambda x, a=axis, k=keep: ops.mean(x, a, k),
        lambda x, a=axis, k=keep: torch.mean(x, dims(a, 3), keepdim=k))
    add(f"max-{name}", [N(6, 7, 8)], lambda x, a=axis, k=keep: ops.max(x, a, k),
        lambda x, a=axis, k=keep: torch.amax(x, dims(a, 3), keepdim=k))
    add(f"min-{name}", [N(6, 7, 8)], lambda x, a=axis, k=keep: ops.min(x, a, k),
        lambda x, a=axis, k=keep: torch.amin(x, dims(a, 3), keepdim=k))
    for c in (0, 1):
        add(f"var-c{c}-{name}", [N(6, 7, 8)], lambda x, a=axis, k=keep, c=c: ops.var(x, a, k, correction=c),
            lambda x, a=axis, k=keep, c=c: torch.var(x, dims(a, 3), correction=c, keepdim=k))
# ties: amax/amin and distbp both share the gradient equally among tied maxima
add("max-ties-ax1", [Q(6, 10, lo=0, hi=3)], lambda x: ops.max(x, 1), lambda x: torch.amax(x, 1))
add("min-ties-all", [Q(6, 10, lo=0, hi=3)], lambda x: ops.min(x), lambda x: torch.amin(x))
add("var-c2", [N(6, 9)], lambda x: ops.var(x, 1, correction=2), lambda x: torch.var(x, 1, correction=2))
add("var-method-default", [N(6, 9)], lambda x: x.var(), lambda x: torch.var(x, correction=0))

# shapes
add("reshape", [N(4, 6, 8)], lambda x: ops.reshape(x, (24, 8)), lambda x: x.reshape(24, 8))
add("reshape-infer", [N(4, 6, 8)], lambda x: x.reshape(3, -1, 4), lambda x: x.reshape(3, -1, 4))
add("transpose-reverse", [N(4, 6, 8)], lambda x: ops.transpose(x), lambda x: x.permute(2, 1, 0))
add("transpose-120", [N(4, 6, 8)], lambda x: ops.transpose(x, (1, 2, 0)), lambda x: x.permute(1, 2, 0))
add("swapaxes", [N(4, 6, 8)], lambda x: ops.swapaxes(x, 0, -1), lambda x: x.transpose(0, -1))
add("squeeze-all", [N(4, 1, 8, 1)], lambda x: ops.squeeze(x), lambda x: x.squeeze())
add("squeeze-ax1", [N(4, 1, 8, 1)], lambda x: ops.squeeze(x, 1), lambda x: x.squeeze(1))
add("unsqueeze-0", [N(4, 8)], lambda x: ops.unsqueeze(x, 0), lambda x: x.unsqueeze(0))
add("unsqueeze-neg1", [N(4, 8)], lambda x: ops.unsqueeze(x, -1), lambda x: x.unsqueeze(-1))
add("broadcast_to", [N(6, 1)], lambda x: ops.broadcast_to(x, (4, 6, 8)), lambda x: torch.broadcast_to(x, (4, 6, 8)))

# indexing
MASK = np.random.default_rng(3).random((6, 8)) < 0.5
ROWS = np.array([0, 5, 5, 2, 0, 0])
add("getitem-int", [N(6, 8)], lambda x: x[2], lambda x: x[2])
add("getitem-slices", [N(6, 8)], lambda x: x[1:5, ::3], lambda x: x[1:5, ::3])
add("getitem-neg-step", [N(6, 8)], lambda x: x[::-1, -1:0:-2],  # torch has no negative steps
    lambda x: x[T(np.arange(6)[::-1].copy())][:, T(np.arange(8)[-1:0:-2].copy())])
add("getitem-ellipsis-newaxis", [N(4, 6, 8)], lambda x: x[None, ..., 3], lambda x: x[None, ..., 3])
add("getitem-repeated-rows", [N(6, 8)], lambda x: x[ROWS], lambda x: x[T(ROWS)])
add("getitem-negative-rows", [N(6, 8)], lambda x: x[ROWS - 6], lambda x: x[T(ROWS - 6)])
add("getitem-rows-of-3d", [N(6, 4, 3)], lambda x: x[ROWS.reshape(2, 3)], lambda x: x[T(ROWS.reshape(2, 3))])
add("getitem-2d-index", [N(6, 8)], lambda x: x[ROWS.reshape(2, 3)], lambda x: x[T(ROWS.reshape(2, 3))])
add("getitem-pair-arrays", [N(6, 8)], lambda x: x[ROWS, ROWS + 1], lambda x: x[T(ROWS), T(ROWS + 1)])
add("getitem-array-slice", [N(6, 8)], lambda x: x[ROWS, 2:7], lambda x: x[T(ROWS), 2:7])
add("getitem-slice-array", [N(6, 8)], lambda x: x[:, ROWS], lambda x: x[:, T(ROWS)])
add("getitem-bool-mask", [N(6, 8)], lambda x: x[MASK], lambda x: x[T(MASK)])
add("getitem-bool-rows", [N(6, 8)], lambda x: x[MASK[:, 0]], lambda x: x[T(MASK[:, 0].copy())])
add("getitem-tensor-index", [N(6, 8)], lambda x: x[Tensor(ROWS)], lambda x: x[T(ROWS)])
GIDX = np.random.default_rng(4).integers(0, 8, (6, 5))
GIDX0 = np.random.default_rng(4).integers(0, 6, (3, 8))
add("gather-ax1", [N(6, 8)], lambda x: ops.gather(x, 1, GIDX), lambda x: torch.gather(x, 1, T(GIDX)))
add("gather-ax0", [N(6, 8)], lambda x: ops.gather(x, 0, GIDX0), lambda x: torch.gather(x, 0, T(GIDX0)))
EIDX = np.random.default_rng(6).integers(0, 10, (4, 7))
add("embedding", [N(10, 5)], lambda w: ops.embedding(EIDX, w), lambda w: F.embedding(T(EIDX), w))

# joining and padding
add("concatenate-ax0", [N(2, 8), N(5, 8), N(1, 8)], lambda *xs: ops.concatenate(xs, 0), lambda *xs: torch.cat(xs, 0))
add("concatenate-ax-1", [N(4, 3, 2), N(4, 3, 5)], lambda *xs: ops.concatenate(xs, -1), lambda *xs: torch.cat(xs, -1))
add("stack-ax0", [N(4, 8), N(4, 8)], lambda *xs: ops.stack(xs), lambda *xs: torch.stack(xs))
add("stack-ax-1", [N(4, 8), N(4, 8), N(4, 8)], lambda *xs: ops.stack(xs, -1), lambda *xs: torch.stack(xs, -1))


def torch_pad(pad_width):
    """numpy's ((before, after) per axis, first axis first) -> torch's flat list, last axis first."""
    return [w for pair in reversed(pad_width) for w in pair]


add("pad-2d", [N(4, 8)], lambda x: ops.pad(x, ((1, 2), (0, 3))), lambda x: F.pad(x, torch_pad(((1, 2), (0, 3)))))
add("pad-3d-value", [N(2, 4, 8)], lambda x: ops.pad(x, ((0, 0), (2, 0), (1, 1)), value=-1.5),
    lambda x: F.pad(x, torch_pad(((0, 0), (2, 0), (1, 1))), value=-1.5))
add("pad-int", [N(4, 8)], lambda x: ops.pad(x, 2), lambda x: F.pad(x, [2, 2, 2, 2]))

# linear algebra: contractions, atol=ATOL_SUM (see there)
add("matmul-2d", [N(8, 32), N(32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-batched", [N(3, 8, 32), N(3, 32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-broadcast", [N(3, 1, 8, 32), N(4, 32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-batch-x-2d", [N(3, 8, 32), N(32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-4d-x-2d", [N(2, 3, 8, 32), N(32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-transposed-batch-x-2d", [N(3, 32, 8), N(32, 16)], lambda a, b: ops.matmul(a.swapaxes(-1, -2), b),
    lambda a, b: torch.matmul(a.transpose(-1, -2), b), atol=ATOL_SUM)
add("matmul-batch-x-2d-empty-inner", [N(3, 8, 0), N(0, 16)], ops.matmul, torch.matmul)
add("matmul-1d-2d", [N(32), N(32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-2d-1d", [N(8, 32), N(32)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-1d-batch", [N(32), N(3, 32, 16)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("matmul-1d-1d", [N(32), N(32)], ops.matmul, torch.matmul, atol=ATOL_SUM)
add("linear", [N(8, 32), N(16, 32), N(16)], ops.linear, F.linear, atol=ATOL_SUM)
add("linear-no-bias", [N(8, 32), N(16, 32)], ops.linear, F.linear, atol=ATOL_SUM)
add("linear-3d", [N(3, 8, 32), N(16, 32), N(16)], ops.linear, F.linear, atol=ATOL_SUM)
add("linear-1d", [N(32), N(16, 32), N(16)], ops.linear, F.linear, atol=ATOL_SUM)

# softmax family and losses
add("softmax-last", [N(4, 6, 10, scale=3)], lambda x: ops.softmax(x), lambda x: torch.softmax(x, -1))
add("softmax-ax1", [N(4, 6, 10, scale=3)], lambda x: ops.softmax(x, 1), lambda x: torch.softmax(x, 1))
add("log_softmax-last", [N(4, 6, 10, scale=3)], lambda x: ops.log_softmax(x), lambda x: torch.log_softmax(x, -1))
add("log_softmax-ax0", [N(4, 6, 10, scale=3)], lambda x: ops.log_softmax(x, 0), lambda x: torch.log_softmax(x, 0))
# attention's form: scale and a causal mask in one node; torch's equivalent is masked_fill then softmax
_CAUSAL = np.tril(np.ones((5, 5), dtype=bool))
add("softmax-scale-mask", [N(2, 3, 5, 5, scale=3)],
    lambda x: ops.softmax(x, -1, scale=0.35, mask=_CAUSAL),
    lambda x: torch.softmax((x * 0.35).masked_fill(~torch.from_numpy(_CAUSAL), float("-inf")), -1))
add("softmax-scale-ax1", [N(4, 6, 10, scale=3)], lambda x: ops.softmax(x, 1, scale=-2.0),
    lambda x: torch.softmax(x * -2.0, 1))
add("softmax-empty-axis", [N(3, 0)], lambda x: ops.softmax(x), lambda x: torch.softmax(x, -1))
add("log_softmax-empty-axis", [N(3, 0)], lambda x: ops.log_softmax(x), lambda x: torch.log_softmax(x, -1))
add("softmax-empty-batch", [N(0, 5)], lambda x: ops.softmax(x), lambda x: torch.softmax(x, -1))


def torch_cross_entropy(logits, target, **kw):
    """distbp's classes-last cross_entropy in torch terms: move classes to axis 1 (torch's convention)."""
    if logits.ndim > 2:
        logits = logits.movedim(-1, 1)
    return F.cross_entropy(logits, T(target), **kw)


rng_t = np.random.default_rng(8)
TGT = rng_t.integers(0, 10, 16)
TGT3 = rng_t.integers(0, 10, (4, 6))
TGT_IGN = np.where(rng_t.random(16) < 0.3, -100, TGT)
TGT_IGN3 = np.where(rng_t.random((4, 6)) < 0.3, 3, TGT3)
for red in ("mean", "sum", "none"):
    add(f"cross_entropy-2d-{red}", [N(16, 10, scale=2)], lambda x, r=red: ops.cross_entropy(x, TGT, reduction=r),
        lambda x, r=red: torch_cross_entropy(x, TGT, reduction=r))
    add(f"cross_entropy-3d-{red}", [N(4, 6, 10, scale=2)], lambda x, r=red: ops.cross_entropy(x, TGT3, reduction=r),
        lambda x, r=red: torch_cross_entropy(x, TGT3, reduction=r))
    add(f"cross_entropy-ignore-{red}", [N(16, 10, scale=2)],
        lambda x, r=red: ops.cross_entropy(x, TGT_IGN, reduction=r),
        lambda x, r=red: torch_cross_entropy(x, TGT_IGN, reduction=r))
    add(f"cross_entropy-3d-ignore3-{red}", [N(4, 6, 10, scale=2)],
        lambda x, r=red: ops.cross_entropy(x, TGT_IGN3, reduction=r, ignore_index=3),
        lambda x, r=red: torch_cross_entropy(x, TGT_IGN3, reduction=r, ignore_index=3))
    add(f"mse_loss-{red}", [N(8, 16), N(8, 16)], lambda x, y, r=red: ops.mse_loss(x, y, reduction=r),
        lambda x, y, r=red: F.mse_loss(x, y, reduction=r))
add("cross_entropy-1d-logits", [N(10, scale=2)], lambda x: ops.cross_entropy(x, np.array(4)),
    lambda x: F.cross_entropy(x, T(np.array(4))))

add("layer_norm-plain", [N(4, 6, 16)], lambda x: ops.layer_norm(x, 16), lambda x: F.layer_norm(x, (16,)))
add("layer_norm-affine", [N(4, 6, 16), N(16), N(16)], lambda x, w, b: ops.layer_norm(x, (16,), w, b),
    lambda x, w, b: F.layer_norm(x, (16,), w, b))
add("layer_norm-weight-only", [N(4, 16), N(16)], lambda x, w: ops.layer_norm(x, 16, w),
    lambda x, w: F.layer_norm(x, (16,), w))
add("layer_norm-2d-shape", [N(4, 6, 16), N(6, 16), N(6, 16)], lambda x, w, b: ops.layer_norm(x, (6, 16), w, b),
    lambda x, w, b: F.layer_norm(x, (6, 16), w, b))
add("layer_norm-eps", [N(4, 16, scale=0.01)], lambda x: ops.layer_norm(x, 16, eps=1e-3),
    lambda x: F.layer_norm(x, (16,), eps=1e-3))
add("layer_norm-np-float64-eps", [N(4, 16)], lambda x: ops.layer_norm(x, 16, eps=np.float64(1e-5)),
    lambda x: F.layer_norm(x, (16,), eps=1e-5))

# windows: NCHW on both sides; conv2d is a contraction, atol=ATOL_SUM (see there)
add("unfold-k3", [N(2, 3, 6, 7)], lambda x: ops.unfold(x, 3), lambda x: F.unfold(x, 3))
add("unfold-k2-s2-p1", [N(2, 3, 6, 7)], lambda x: ops.unfold(x, 2, stride=2, padding=1),
    lambda x: F.unfold(x, 2, stride=2, padding=1))
add("unfold-rect", [N(2, 3, 6, 7)], lambda x: ops.unfold(x, (3, 2), stride=(1, 2), padding=(0, 1)),
    lambda x: F.unfold(x, (3, 2), stride=(1, 2), padding=(0, 1)))
add("conv2d", [N(2, 3, 10, 10), N(8, 3, 3, 3), N(8)], ops.conv2d, F.conv2d, atol=ATOL_SUM)
add("conv2d-no-bias", [N(2, 3, 10, 10), N(8, 3, 3, 3)], ops.conv2d, F.conv2d, atol=ATOL_SUM)
add("conv2d-s2-p1", [N(2, 3, 11, 11), N(4, 3, 3, 3), N(4)],
    lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding=1),
    lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), atol=ATOL_SUM)
add("conv2d-rect", [N(2, 3, 9, 10), N(4, 3, 2, 3)],
    lambda x, w: ops.conv2d(x, w, stride=(2, 1), padding=(1, 0)),
    lambda x, w: F.conv2d(x, w, stride=(2, 1), padding=(1, 0)), atol=ATOL_SUM)
add("conv2d-1x1", [N(2, 6, 5, 5), N(4, 6, 1, 1), N(4)], ops.conv2d, F.conv2d, atol=ATOL_SUM)

# weights and biases given as (float64) numpy arrays are constants of the input's dtype, like other array operands
rng_w = np.random.default_rng(9)
LIN_W, CONV_W, LN_W = rng_w.standard_normal((16, 32)), rng_w.standard_normal((4, 3, 3, 3)), rng_w.uniform(0.5, 2, 16)
add("linear-numpy-weight", [N(8, 32)], lambda x: ops.linear(x, LIN_W, LIN_W[:, 0]),
    lambda x: F.linear(x, T(LIN_W).to(x.dtype), T(LIN_W[:, 0].copy()).to(x.dtype)), atol=ATOL_SUM)
add("conv2d-numpy-weight", [N(2, 3, 8, 8)], lambda x: ops.conv2d(x, CONV_W, CONV_W[:, 0, 0, 0].copy(), padding=1),
    lambda x: F.conv2d(x, T(CONV_W).to(x.dtype), T(CONV_W[:, 0, 0, 0].copy()).to(x.dtype), padding=1),
    atol=ATOL_SUM)
add("layer_norm-numpy-affine", [N(4, 16)], lambda x: ops.layer_norm(x, 16, LN_W, LN_W - 1),
    lambda x: F.layer_norm(x, (16,), T(LN_W).to(x.dtype), T(LN_W - 1).to(x.dtype)))
POOLS = [
    ("k2", dict(kernel_size=2)),  # tiling fast path
    ("rect-tiles", dict(kernel_size=(2, 4))),  # tiling fast path, windows wider than tall
    ("k2-s1", dict(kernel_size=2, stride=1)),
    ("k3-s2-p1", dict(kernel_size=3, stride=2, padding=1)),
    ("rect", dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1))),
    ("k2-odd", dict(kernel_size=2)),  # 9x9 does not tile: the unfold path with a dropped border
]
for name, kw in POOLS:
    shape = (2, 3, 9, 9) if name == "k2-odd" else (2, 3, 8, 8)
    add(f"max_pool2d-{name}", [N(*shape)], lambda x, kw=kw: ops.max_pool2d(x, **kw),
        lambda x, kw=kw: F.max_pool2d(x, **kw))
    add(f"avg_pool2d-{name}", [N(*shape)], lambda x, kw=kw: ops.avg_pool2d(x, **kw),
        lambda x, kw=kw: F.avg_pool2d(x, **kw, count_include_pad=True))
    # tied maxima in a window (values from {0, 1, 2}): torch's gradient goes to the first maximum
    add(f"max_pool2d-ties-{name}", [Q(*shape, step=1.0, lo=0, hi=2)], lambda x, kw=kw: ops.max_pool2d(x, **kw),
        lambda x, kw=kw: F.max_pool2d(x, **kw))

# dropout with p=0 or in eval mode is the identity in both
add("dropout-eval", [N(8, 16)], lambda x: ops.dropout(x, 0.5, training=False) * 1.0,
    lambda x: F.dropout(x, 0.5, training=False) * 1.0)
add("dropout-p0", [N(8, 16)], lambda x: ops.dropout(x, 0.0) * 1.0, lambda x: F.dropout(x, 0.0) * 1.0)

assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# --- running a case ------------------------------------------------------------------------------


def run(case, dtype, seed=0):
    """Inputs, distbp's and torch's outputs and input gradients for one case."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(m(rng), dtype=dtype) for m in case.inputs]
    dx = [Tensor(a.copy(), requires_grad=True, dtype=dtype) for a in arrays]
    tx = [torch.from_numpy(a.copy()).requires_grad_(True) for a in arrays]
    dy = case.d(*dx)
    ty = case.t(*tx)
    cot = rng.standard_normal(dy.shape).astype(dy.dtype)
    dy.backward(cot)
    ty.backward(torch.from_numpy(cot).to(ty.dtype))
    return dx, tx, dy, ty


def params(kind, dtypes):
    """One pytest.param per (dtype, case), with a strict xfail on each known bug the test would hit."""
    out = []
    for dtype in dtypes:
        for c in CASES:
            bug = c.xfail if c.xfail and f"{kind}-{np.dtype(dtype).name}" in c.xfail.breaks else None
            # numpy's warnings about the nan/inf a known bug produces are noise here
            marks = [pytest.mark.filterwarnings("ignore::RuntimeWarning")] if c.xfail else []
            if bug is not None:
                marks.append(pytest.mark.xfail(strict=True, raises=bug.raises, reason=bug.reason))
            prefix = "" if len(dtypes) == 1 else f"{np.dtype(dtype).name}-"
            out.append(pytest.param(c, dtype, id=prefix + c.id, marks=marks))
    return out


def assert_matches(dx, tx, dy, ty, rtol, atol):
    assert dy.shape == tuple(ty.shape), f"output shape {dy.shape}, torch {tuple(ty.shape)}"
    np.testing.assert_allclose(dy.data, ty.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward")
    for i, (d, t) in enumerate(zip(dx, tx)):
        assert d.grad is not None, f"input {i} got no gradient"
        assert t.grad is not None
        np.testing.assert_allclose(d.grad.data, t.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"grad of input {i}")


@pytest.mark.parametrize("case, dtype", params("values", [np.float32]))
def test_matches_torch_float32(case, dtype):
    dx, tx, dy, ty = run(case, dtype)
    assert_matches(dx, tx, dy, ty, case.rtol, case.atol)


@pytest.mark.parametrize("case, dtype", params("values", [np.float64]))
def test_matches_torch_float64(case, dtype):
    dx, tx, dy, ty = run(case, dtype)
    assert_matches(dx, tx, dy, ty, RTOL64, ATOL64)


@pytest.mark.parametrize("case, dtype", params("dtype", [np.float32, np.float64]))
def test_dtype_preserved(case, dtype):
    rng = np.random.default_rng(0)
    dx = [Tensor(m(rng), requires_grad=True, dtype=dtype) for m in case.inputs]
    dy = case.d(*dx)
    want = np.dtype(case.out_dtype or dtype)
    assert dy.dtype == want, f"{np.dtype(dtype).name} in gave {dy.dtype} out"
    dy.backward(np.ones(dy.shape, dy.dtype))
    for i, x in enumerate(dx):
        assert x.grad is not None, f"input {i} got no gradient"
        assert x.grad.dtype == np.dtype(dtype), f"input {i}: {np.dtype(dtype).name} input, {x.grad.dtype} gradient"


# --- dropout: random masks cannot match torch's, so compare the convention instead -------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_scaling_and_gradient_match_torch_convention(p, dtype):
    x = np.random.default_rng(0).uniform(0.5, 2.0, (200, 50)).astype(dtype)  # no zeros in x
    dx = Tensor(x, requires_grad=True, dtype=dtype)
    dy = ops.dropout(dx, p, rng=np.random.default_rng(1))
    dy.backward(np.ones(dy.shape, dtype))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    torch.manual_seed(0)
    ty = F.dropout(tx, p, training=True)
    ty.sum().backward()
    assert dy.dtype == dtype and dx.grad.dtype == dtype
    for y, g in ((dy.data, dx.grad.data), (ty.detach().numpy(), tx.grad.numpy())):
        kept = y != 0
        # kept elements are scaled by 1/(1-p), dropped ones are 0, and the gradient is the same mask*scale
        np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
        np.testing.assert_allclose(g, kept / (1 - p), rtol=1e-6)
        assert abs(kept.mean() - (1 - p)) < 0.02  # 10,000 draws: 4+ standard deviations
    # same seed, same mask; another seed, another mask
    again = ops.dropout(Tensor(x, dtype=dtype), p, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(again.data, dy.data)
    other = ops.dropout(Tensor(x, dtype=dtype), p, rng=np.random.default_rng(2))
    assert (other.data != dy.data).any()


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the forward's 0 ** -1, as numpy says
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
def test_pow_gradients_where_base_or_exponent_is_zero_or_the_base_negative_match_torch(create_graph):
    # 0 ** 0 gave the base a nan gradient (0 * inf), and a negative base gave the exponent 0 where torch
    # says nan (log of a negative number)
    a = np.array([0.0, 0.0, 0.0, 2.0, -2.0, -2.0, 0.5, 0.0], np.float32)
    b = np.array([0.0, 2.0, -1.0, 0.0, 2.0, 0.0, 1.5, 1.0], np.float32)
    da, db = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    ga, gb = grad(ops.pow(da, db).sum(), [da, db], create_graph=create_graph)
    ta, tb = torch.from_numpy(a).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
    torch.pow(ta, tb).sum().backward()
    assert ga.dtype == gb.dtype == np.float32
    np.testing.assert_allclose(ga.data, ta.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(gb.data, tb.grad.numpy(), rtol=1e-6)  # nan where torch has nan, inf where inf


def test_layer_norm_of_integers_is_float32_and_mean_over_nothing_is_refused():
    assert ops.layer_norm(Tensor(np.array([[1, 4]])), 2).dtype == np.float32  # was float64
    with pytest.raises(ValueError, match=r"mean over an empty axis of a tensor of shape \(3, 0\)"):
        ops.mean(Tensor(np.zeros((3, 0), np.float32)), 1)


@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(3, 2), stride=1,
                                                                                padding=(1, 1))],
                         ids=["3-2-1", "rect-overlapping"])
def test_max_pool2d_gives_the_gradient_of_a_window_of_minus_inf_to_its_first_cell_not_the_padding(kw, create_graph):
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 4)).astype(np.float32)
    x[0, 0, :2, :2] = x[0, 1, 3:, 2:] = -np.inf  # a corner of each channel: windows there tie with the padding
    dx = Tensor(x, requires_grad=True)
    (gx,) = grad(ops.max_pool2d(dx, **kw).sum(), [dx], create_graph=create_graph)
    tx = torch.from_numpy(x).requires_grad_(True)
    F.max_pool2d(tx, **kw).sum().backward()
    np.testing.assert_array_equal(gx.data, tx.grad.numpy())  # the -inf corner's gradient was lost


# --- max pooling of a window whose maximum is NaN ----------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's max over windows with a NaN says so
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=(2, 4)), dict(kernel_size=2, stride=1)],
                         ids=["tiles", "rect-tiles", "overlapping"])
def test_max_pool2d_sends_the_gradient_of_a_nan_window_to_the_nan_like_torch(kw, create_graph):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    # at most one NaN per window: torch sends a window's gradient to its last NaN, distbp to its first
    x[0, 0, 0, 1] = x[0, 0, 5, 6] = x[1, 2, 7, 7] = np.nan
    x[1, 1, 2, 2] = np.inf
    dx = Tensor(x, requires_grad=True)
    dy = ops.max_pool2d(dx, **kw)
    cot = rng.standard_normal(dy.shape).astype(np.float32)
    (gx,) = grad((dy * Tensor(cot)).sum(), [dx], create_graph=create_graph)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    F.max_pool2d(tx, **kw).backward(torch.from_numpy(cot))
    np.testing.assert_array_equal(dy.data, F.max_pool2d(torch.from_numpy(x), **kw).numpy())
    np.testing.assert_allclose(gx.data, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    assert gx.data[0, 0, 0, 1] != 0
