"""The backward engine: ordering, accumulation, broadcasting, freeing, hooks, higher order, errors."""

import gc
import math
import tracemalloc

import numpy as np
import pytest

import distbp
from distbp import Tensor, no_grad
from distbp import nn, optim
from distbp.autograd import grad, ops


def leaf(shape, rng, dtype=np.float32):
    return Tensor(rng.standard_normal(shape), requires_grad=True, dtype=dtype)


# --- graph shape -----------------------------------------------------------------------------------


def test_chain_of_10000_ops_needs_no_recursion(rng):
    x = leaf((3,), rng)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    expected = np.full(3, 1.0001**10_000, np.float32)
    np.testing.assert_allclose(x.grad.data, expected, rtol=1e-3)


def test_node_reused_many_times_accumulates(rng):
    x = leaf((4,), rng)
    h = x * 2.0  # one interior node feeding 500 consumers
    total = h
    for _ in range(499):
        total = total + h
    total.sum().backward()
    np.testing.assert_allclose(x.grad.data, np.full(4, 1000.0), rtol=1e-6)


def test_leaf_used_twice_in_one_op_accumulates(rng):
    x = leaf((5,), rng)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.data, 2 * x.data, rtol=1e-6)


def test_diamond_graph(rng):
    x = leaf((3,), rng)
    a = x.exp()
    b = a * 3.0
    c = a * a
    (b + c).sum().backward()
    ex = np.exp(x.data)
    np.testing.assert_allclose(x.grad.data, 3 * ex + 2 * ex * ex, rtol=1e-5)


def test_gradients_accumulate_across_backward_calls(rng):
    x = leaf((3,), rng)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad.data, np.full(3, 5.0))


def test_broadcast_gradient_is_reduced_to_input_shape(rng):
    a = leaf((3, 1, 4), rng)
    b = leaf((2, 4), rng)
    c = leaf((), rng)
    (a * b + c).sum().backward()
    assert a.grad.shape == (3, 1, 4) and b.grad.shape == (2, 4) and c.grad.shape == ()
    np.testing.assert_allclose(a.grad.data, np.broadcast_to(b.data.sum(0), (3, 1, 4)), rtol=1e-5)
    np.testing.assert_allclose(b.grad.data, np.broadcast_to(a.data.sum(0), (2, 4)), rtol=1e-5)
    assert c.grad.data == pytest.approx(24.0)


def test_float64_graph_keeps_float64(rng):
    x = leaf((3, 2), rng, np.float64)
    w = leaf((2, 2), rng, np.float64)
    (x @ w).tanh().sum().backward()
    assert x.grad.dtype == np.float64 and w.grad.dtype == np.float64


def test_grads_of_two_leaves_never_share_memory(rng):
    # add passes its incoming gradient through unchanged to both inputs: .grad must still own its memory
    a, b = leaf((3,), rng), leaf((3,), rng)
    (a + b).sum().backward()
    a.grad.data *= 10
    np.testing.assert_array_equal(b.grad.data, np.ones(3, np.float32))
    assert a.grad.data.flags.writeable and a.grad.data.base is None


def test_unused_branch_gets_no_gradient(rng):
    x, y = leaf((2,), rng), leaf((2,), rng)
    (x * 2.0).sum().backward()
    assert y.grad is None


def test_integer_index_tensor_does_not_need_grad(rng):
    w = leaf((5, 3), rng)
    idx = Tensor(np.array([0, 4, 4]))
    w[idx].sum().backward()
    np.testing.assert_array_equal(w.grad.data[:, 0], [1, 0, 0, 0, 2])


# --- freeing ---------------------------------------------------------------------------------------


def test_backward_frees_the_graph_and_a_second_backward_says_so(rng):
    x = leaf((3,), rng)
    y = x.exp()
    z = y.sum()
    z.backward()
    assert y.grad_fn.freed and y.grad_fn._out is None
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        z.backward()


def test_retain_graph_allows_a_second_backward(rng):
    x = leaf((3,), rng)
    z = (x.exp() * x).sum()
    z.backward(retain_graph=True)
    first = x.grad.data.copy()
    z.backward()
    np.testing.assert_allclose(x.grad.data, 2 * first, rtol=1e-6)


def test_cross_entropy_retained_graph_gives_same_gradient_twice(rng):
    logits = leaf((4, 5), rng)
    loss = ops.cross_entropy(logits, np.array([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    first = logits.grad.data.copy()
    logits.grad = None
    loss.backward()
    np.testing.assert_array_equal(logits.grad.data, first)


@pytest.mark.parametrize("rows,classes", [(70000, 2), (2, 70000)], ids=["many-targets", "many-classes"])
def test_float16_cross_entropy_of_many_targets_or_classes_is_computed_in_float32(rows, classes):
    # past 65504 targets the count was inf in float16 (loss 0), and past 65504 classes a row's exp sum
    logits = np.zeros((rows, classes))
    for reduction in ("mean", "sum", "none"):
        x = Tensor(logits, requires_grad=True, dtype=np.float16)
        loss = ops.cross_entropy(x, np.zeros(rows, np.int64), reduction=reduction)
        assert loss.dtype == np.float16
        want = math.log(classes) * (rows if reduction == "sum" else 1)
        np.testing.assert_allclose(loss.data.astype(np.float64), want, rtol=2e-3)
        if reduction != "none":
            loss.backward()
            assert x.grad.dtype == np.float16
            per_row = 1 if reduction == "sum" else 1 / rows
            np.testing.assert_allclose(x.grad.data[:, 1].astype(np.float64), per_row / classes, rtol=2e-2)


@pytest.mark.parametrize("logits_shape,target", [((3, 4), [-100, -100, -100]), ((0, 4), np.zeros(0, np.int64))],
                         ids=["all-ignored", "empty-batch"])
def test_cross_entropy_mean_over_no_counted_target_is_zero_not_nan(logits_shape, target):
    # documented in cross_entropy (PyTorch gives nan here)
    logits = Tensor(np.ones(logits_shape, np.float32), requires_grad=True)
    loss = ops.cross_entropy(logits, np.asarray(target))
    assert loss.item() == 0.0 and loss.dtype == np.float32
    loss.backward()
    np.testing.assert_array_equal(logits.grad.data, np.zeros(logits_shape, np.float32))


def test_memory_stays_flat_over_1000_training_steps():
    distbp.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((64, 32)))
    t = rng.integers(0, 10, 64)

    def step():
        opt.zero_grad()
        loss = ops.cross_entropy(model(x), t)
        loss.backward()
        opt.step()

    gc.collect()
    gc.disable()  # the graph must be freed by reference counting alone: no cycles
    try:
        tracemalloc.start()
        for _ in range(50):
            step()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            step()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    finally:
        gc.enable()
    assert grown < 64 * 1024, f"memory grew by {grown} bytes over 1000 steps"


# --- hooks ------------------------------------------------------------------------------------------


def test_tensor_hook_sees_and_replaces_gradient(rng):
    x = leaf((3,), rng)
    y = x * 2.0
    seen = []
    y.register_hook(lambda g: seen.append(np.array(g)) or g * 10)
    y.sum().backward()
    np.testing.assert_array_equal(seen[0], np.ones(3))
    np.testing.assert_allclose(x.grad.data, np.full(3, 20.0))


def test_leaf_hook_and_handle_remove(rng):
    x = leaf((3,), rng)
    h = x.register_hook(lambda g: g * 0)
    (x * 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.zeros(3))
    h.remove()
    x.grad = None
    (x * 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.ones(3))


def test_post_accumulate_hook_fires_as_soon_as_the_leaf_is_final(rng):
    """The last layer's weight is final before the first layer's gradient is even computed."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    order = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda t, name=name: order.append((name, t.grad is not None)))
    model(Tensor(rng.standard_normal((3, 4)))).sum().backward()
    names = [n for n, _ in order]
    assert all(ok for _, ok in order)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert names.index("4.weight") < names.index("2.weight") < names.index("0.weight")


def test_post_accumulate_hook_fires_once_for_a_reused_parameter(rng):
    w = leaf((3, 3), rng)
    calls = []
    w.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad.data.copy()))
    x = Tensor(rng.standard_normal((2, 3)))
    ((x @ w) @ w).sum().backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], w.grad.data)


# --- gradient destinations -------------------------------------------------------------------------


def _reference_grads(build, x):
    params = build()
    (build.forward(params, x) ** 2).sum().backward()
    return [p.grad.data.copy() for p in params]


class _TwoLayers:
    """Linear (weight and bias), then a 2-D matmul with a leaf on the right, then one on the left."""

    def __init__(self, rng):
        self.values = [rng.standard_normal(s).astype(np.float32) for s in ((5, 4), (5,), (5, 3), (2, 6))]

    def __call__(self):
        return [Tensor(v.copy(), requires_grad=True) for v in self.values]

    @staticmethod
    def forward(params, x):
        w, b, m, left = params
        return left @ (ops.linear(x, w, b) @ m)  # (2, 6) @ (6, 5) @ (5, 3)


def test_gradients_are_written_into_their_destinations(rng):
    build = _TwoLayers(rng)
    x = Tensor(rng.standard_normal((6, 4)))
    expected = _reference_grads(build, x)
    params = build()
    dests = [np.full(p.shape, np.nan, np.float32) for p in params]
    for p, d in zip(params, dests):
        p.set_grad_destination(d)
    for step in range(2):  # the same memory again on the next fresh backward
        for p in params:
            p.grad = None
        (build.forward(params, x) ** 2).sum().backward()
        for p, d, e in zip(params, dests, expected):
            assert p.grad.data is d  # no copy: .grad is the destination itself
            np.testing.assert_allclose(d, e, rtol=1e-6, atol=1e-6)
    (build.forward(params, x) ** 2).sum().backward()  # not fresh: accumulates in place, still there
    for p, d, e in zip(params, dests, expected):
        assert p.grad.data is d
        np.testing.assert_allclose(d, 2 * e, rtol=1e-6, atol=1e-6)


class _BatchedLayers(_TwoLayers):
    """The same leaves on a batch of sequences: linear and matmul fold the batch into one product, and the
    right-hand leaf's gradient comes out summed over it."""

    def __init__(self, rng):
        self.values = [rng.standard_normal(s).astype(np.float32) for s in ((5, 4), (5,), (5, 3))]

    @staticmethod
    def forward(params, x):
        w, b, m = params
        return ops.linear(x, w, b) @ m  # (2, 6, 4) -> (2, 6, 5) -> (2, 6, 3)


def test_batched_gradients_are_written_into_their_destinations(rng):
    build = _BatchedLayers(rng)
    x = Tensor(rng.standard_normal((2, 6, 4)))
    expected = _reference_grads(build, x)
    params = build()
    dests = [np.full(p.shape, np.nan, np.float32) for p in params]
    for p, d in zip(params, dests):
        p.set_grad_destination(d)
    (build.forward(params, x) ** 2).sum().backward()
    for p, d, e in zip(params, dests, expected):
        assert p.grad.data is d
        np.testing.assert_allclose(d, e, rtol=1e-5, atol=1e-5)
    m = build()[2]  # and without a destination, against the unfolded product summed by hand
    x64 = x.data.astype(np.float64)
    h = x64 @ build.values[0].T.astype(np.float64) + build.values[1]
    want = np.einsum("bti,btj->ij", h, 2 * (h @ m.data.astype(np.float64)))
    (build.forward([Tensor(v) for v in build.values[:2]] + [m], x) ** 2).sum().backward()
    np.testing.assert_allclose(m.grad.data, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "x_shape, w_shape, bias, stride, padding",
    [
        ((3, 2, 6, 6), (4, 2, 3, 3), True, 1, 0),
        ((2, 3, 7, 7), (5, 3, 3, 3), True, 2, 1),  # padded and strided
        ((2, 3, 9, 10), (4, 3, 2, 3), False, (2, 1), (1, 0)),  # rectangular everything, no bias
        ((2, 6, 5, 5), (4, 6, 1, 1), True, 1, 0),  # 1x1
        ((1, 2, 5, 4), (3, 2, 3, 2), True, (1, 2), (0, 1)),  # one image: a single product
    ],
    ids=["plain", "s2-p1", "rect-no-bias", "1x1", "n1"],
)
def test_conv2d_gradients_are_written_into_their_destinations(rng, x_shape, w_shape, bias, stride, padding):
    # conv2d supports stride and padding (int or pair); it has no groups or dilation to cover
    values = [rng.standard_normal(w_shape).astype(np.float32)]
    if bias:
        values.append(rng.standard_normal(w_shape[0]).astype(np.float32))
    xs = [rng.standard_normal(x_shape).astype(np.float32) for _ in range(2)]

    def loss(params, x):
        out = ops.conv2d(x, *params, stride=stride, padding=padding)
        return (out * out).sum()

    expected = []  # per step: the gradients computed without destinations (and the input's)
    for xv in xs:
        params = [Tensor(v.copy(), requires_grad=True) for v in values]
        x = Tensor(xv.copy(), requires_grad=True)
        loss(params, x).backward()
        expected.append([p.grad.data.copy() for p in params] + [x.grad.data.copy()])

    params = [Tensor(v.copy(), requires_grad=True) for v in values]
    dests = [np.full(v.shape, np.nan, np.float32) for v in values]
    for p, d in zip(params, dests):
        p.set_grad_destination(d)
    for xv, want in zip(xs, expected):  # two steps: the same memory again on the next fresh backward
        for p in params:
            p.grad = None
        x = Tensor(xv.copy(), requires_grad=True)
        loss(params, x).backward()
        for p, d, e in zip(params, dests, want):
            assert np.shares_memory(p.grad.data, d)
            assert p.grad.data is d  # written by the op itself: no copy on the way
            assert p.grad.dtype == np.float32
            np.testing.assert_allclose(d, e, rtol=1e-6)
        np.testing.assert_allclose(x.grad.data, want[-1], rtol=1e-6)


@pytest.mark.parametrize("scratch_bytes", [None, 1, 4 * 4 * 27 * 4], ids=["default", "one-by-one", "chunks"])
def test_conv2d_weight_gradient_is_the_batch_sum_of_products_bit_for_bit(rng, monkeypatch, scratch_bytes):
    # written into a destination, or not, the sums are those of the stacked (N, O, C*kh*kw) product
    if scratch_bytes is not None:  # a weight of 4x27 floats: one product at a time, or 3 per batched matmul
        monkeypatch.setattr(ops, "_CONV_SCRATCH_BYTES", scratch_bytes)
    xv = rng.standard_normal((11, 3, 7, 7)).astype(np.float32)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(4), requires_grad=True)
    gout = rng.standard_normal((11, 4, 4, 4)).astype(np.float32)
    cols = ops._unfold_array(xv, (3, 3), (2, 2), (1, 1))
    g = gout.reshape(11, 4, -1)
    want_w = (g @ cols.swapaxes(-1, -2)).sum(axis=0).reshape(4, 3, 3, 3)
    want_b = gout.sum(axis=(0, 2, 3))
    for dest in (False, True):
        w.grad = b.grad = None
        dests = [np.full(p.shape, np.nan, np.float32) if dest else None for p in (w, b)]
        w.set_grad_destination(dests[0])
        b.set_grad_destination(dests[1])
        ops.conv2d(Tensor(xv), w, b, stride=2, padding=1).backward(gout)
        assert (w.grad.data is dests[0] and b.grad.data is dests[1]) if dest else w.grad.data.base is None
        np.testing.assert_array_equal(w.grad.data, want_w)
        np.testing.assert_array_equal(b.grad.data, want_b)


def test_a_destination_is_not_offered_where_it_would_be_wrong(rng):
    """Several contributions, a tensor hook, autograd.grad and create_graph all leave the memory alone."""
    w = leaf((3, 3), rng)
    dest = np.full((3, 3), np.nan, np.float32)
    w.set_grad_destination(dest)
    x = Tensor(rng.standard_normal((2, 3)))
    ((x @ w) @ w).sum().backward()  # two contributions: summed by the engine, not written into dest
    reference = leaf((3, 3), rng)
    reference.data[...] = w.data
    ((x @ reference) @ reference).sum().backward()
    np.testing.assert_allclose(w.grad.data, reference.grad.data, rtol=1e-6)
    assert np.isnan(dest).all()

    w.grad = None
    (gw,) = grad((x @ w).sum(), [w])
    (gw2,) = grad((x @ w).sum(), [w], create_graph=True)
    assert w.grad is None and np.isnan(dest).all()
    np.testing.assert_allclose(gw.data, gw2.data)

    h = w.register_hook(lambda g: g * 2)
    (x @ w).sum().backward()
    h.remove()
    assert np.isnan(dest).all() and w.grad.data is not dest
    np.testing.assert_allclose(w.grad.data, 2 * np.repeat(x.data.sum(0)[:, None], 3, 1), rtol=1e-6)

    w.grad = None
    (x * w[0]).sum().backward()  # an op that does not write into destinations: .grad is its own array
    assert w.grad.data is not dest and np.isnan(dest).all()


def test_a_backward_that_raises_leaves_no_destination_offered(rng):
    w = leaf((2, 3), rng)
    dest = np.full((2, 3), np.nan, np.float32)
    w.set_grad_destination(dest)
    out = ops.linear(Tensor(rng.standard_normal((4, 3))), w)
    loss = (out ** 2).sum()
    failing = type(out._node)

    class Fails(failing):
        __slots__ = ()

        @staticmethod
        def backward(ctx, g):
            raise FloatingPointError("injected")

    out._node.__class__ = Fails
    with pytest.raises(FloatingPointError):
        loss.backward(retain_graph=True)
    out._node.__class__ = failing
    assert out._node.grad_dests is None
    (gw,) = grad(loss, [w])  # over the retained graph: returned, not written into the destination
    assert np.isnan(dest).all() and not np.shares_memory(gw.data, dest)


def test_a_gradient_destination_is_checked(rng):
    w = leaf((3, 2), rng)
    with pytest.raises(ValueError, match=r"float32\[2, 3\] but the tensor is float32\[3, 2\]"):
        w.set_grad_destination(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"float64\[3, 2\]"):
        w.set_grad_destination(np.zeros((3, 2), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        w.set_grad_destination(np.zeros((2, 3), np.float32).T)
    with pytest.raises(TypeError, match="numpy array"):
        w.set_grad_destination([[0.0] * 2] * 3)
    with pytest.raises(RuntimeError, match="leaf"):
        (w * 2).set_grad_destination(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="overlaps the tensor's own data"):
        w.set_grad_destination(w.data)


def test_retain_grad_on_interior_tensor(rng):
    x = leaf((3,), rng)
    y = x * 3.0
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad.data, 2 * y.data, rtol=1e-6)


# --- higher order and functional grad -------------------------------------------------------------


def test_grad_returns_without_touching_dot_grad(rng):
    x = leaf((3,), rng)
    (gx,) = grad((x * x).sum(), [x])
    np.testing.assert_allclose(gx.data, 2 * x.data, rtol=1e-6)
    assert x.grad is None


def test_second_derivative_through_create_graph(rng):
    x = leaf((4,), rng, np.float64)
    y = (x**3).sum()
    (g,) = grad(y, [x], create_graph=True)
    np.testing.assert_allclose(g.data, 3 * x.data**2)
    g.sum().backward()
    np.testing.assert_allclose(x.grad.data, 6 * x.data)


def test_third_derivative(rng):
    x = leaf((3,), rng, np.float64)
    (g1,) = grad(x.exp().sum(), [x], create_graph=True)
    (g2,) = grad(g1.sum(), [x], create_graph=True)
    (g3,) = grad(g2.sum(), [x])
    np.testing.assert_allclose(g3.data, np.exp(x.data))


def test_grad_of_unused_input(rng):
    x, y = leaf((2,), rng), leaf((2,), rng)
    with pytest.raises(RuntimeError, match="not used"):
        grad((x * 2.0).sum(), [x, y])
    gx, gy = grad((x * 2.0).sum(), [x, y], allow_unused=True)
    assert gy is None and np.allclose(gx.data, 2.0)


def test_grad_with_respect_to_an_interior_tensor(rng):
    x = leaf((3,), rng)
    h = x * 2.0
    (gh,) = grad((h * h).sum(), [h])
    np.testing.assert_allclose(gh.data, 2 * h.data, rtol=1e-6)


# --- grad mode ------------------------------------------------------------------------------------


def test_no_grad_records_nothing(rng):
    x = leaf((3,), rng)
    with no_grad():
        y = x * 2.0
    assert y.grad_fn is None and not y.requires_grad
    assert (x * 2.0).requires_grad


def test_no_grad_as_decorator(rng):
    @no_grad()
    def f(t):
        return t * 2.0

    assert not f(leaf((2,), rng)).requires_grad


def test_detach_cuts_the_graph(rng):
    x = leaf((3,), rng)
    y = (x * 2.0).detach()
    assert not y.requires_grad and y.is_leaf
    z = (x * y).sum()
    z.backward()
    np.testing.assert_allclose(x.grad.data, y.data)


def test_backward_with_explicit_gradient(rng):
    x = leaf((2, 3), rng)
    y = x * 2.0
    g = rng.standard_normal((2, 3)).astype(np.float32)
    y.backward(g)
    np.testing.assert_allclose(x.grad.data, 2 * g, rtol=1e-6)


def test_backward_on_a_leaf(rng):
    x = leaf((), rng)
    x.backward()
    assert x.grad.data == 1.0


# --- errors ---------------------------------------------------------------------------------------


def test_backward_on_non_scalar_without_gradient_is_an_error(rng):
    y = leaf((2, 3), rng) * 2.0
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\) needs a gradient"):
        y.backward()


def test_backward_gradient_of_wrong_shape(rng):
    y = leaf((2, 3), rng) * 2.0
    with pytest.raises(ValueError, match=r"gradient has shape \(3, 2\)"):
        y.backward(np.ones((3, 2), np.float32))


def test_backward_gradient_of_wrong_dtype(rng):
    y = leaf((2,), rng) * 2.0
    with pytest.raises(TypeError, match="float64"):
        y.backward(np.ones(2))


def test_backward_takes_a_python_number_as_a_gradient_of_the_outputs_dtype(rng):
    for dtype in (np.float32, np.float16):
        x = leaf((3,), rng, dtype)
        (x * x).sum().backward(2.0)
        assert x.grad.dtype == dtype
        np.testing.assert_allclose(x.grad.data, 4 * x.data, rtol=1e-3)
    y = leaf((2,), rng) * 2.0
    with pytest.raises(TypeError, match="float64"):  # a numpy float64 still says what it is
        y.sum().backward(np.float64(2.0))
    with pytest.raises(ValueError, match=r"gradient has shape \(\)"):  # one number is not a gradient for two
        y.backward(2.0)


def test_backward_on_tensor_without_graph(rng):
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor([1.0, 2.0]).sum().backward()


def test_mismatched_shapes_name_both(rng):
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\)"):
        leaf((2, 3), rng) + leaf((4,), rng)
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\)"):
        leaf((2, 3), rng) @ leaf((4, 5), rng)


def test_mixed_float_dtypes_are_an_error(rng):
    with pytest.raises(TypeError, match="float32 and float64"):
        leaf((2,), rng) * leaf((2,), rng, np.float64)


def test_numpy_float64_scalars_and_arrays_do_not_promote(rng):
    x = leaf((3,), rng)
    for y in (x * np.float64(0.5), x / np.sqrt(np.float64(64)), x + np.zeros(3), np.ones(3) * x):
        assert y.dtype == np.float32


def test_a_complex_constant_is_refused_not_cut_to_its_real_part(rng):
    for t in (leaf((2,), rng), Tensor([1, 2])):
        for c in (1j, np.array([1 + 2j, 3j])):
            with pytest.raises(TypeError, match="complex128"):
                t * c
            with pytest.raises(TypeError, match="complex128"):
                c + t


def test_constants_joined_to_a_tensor_take_its_dtype(rng):
    h = leaf((2,), rng, np.float16)
    for joined in (ops.concatenate([h, np.zeros(3)]), ops.concatenate([np.zeros(3), h]),
                   ops.stack([h, np.zeros(2)]), ops.stack([[1.0, 2.0], h])):
        assert joined.dtype == np.float16
        joined.sum().backward()
    assert ops.concatenate([h, [1, 2]]).dtype == np.float16
    assert ops.concatenate([np.zeros(2), np.ones(2)]).dtype == np.float32  # no tensor: as Tensor() makes them
    assert ops.stack([Tensor([1, 2]), np.array([3, 4], np.int32)]).dtype == np.int64
    with pytest.raises(TypeError, match="dtypes differ"):  # two tensors of different dtypes are still refused
        ops.concatenate([h, leaf((2,), rng)])


def test_integer_and_boolean_tensors_give_float32_where_the_result_is_floating():
    i, b = Tensor([1, 2, 3]), Tensor([True, False])
    floating = {
        "int + float": i + 0.5, "float * int": 1.5 * i, "int / int": i / 2, "int / int tensor": i / Tensor([2, 2, 2]),
        "bool + float": b + 0.5, "int ** float": i ** 0.5, "exp": ops.exp(i), "log": ops.log(i),
        "sqrt": ops.sqrt(i), "tanh": ops.tanh(i), "sigmoid": ops.sigmoid(i), "mean": i.mean(), "var": i.var(),
        "softmax": ops.softmax(i), "log_softmax": ops.log_softmax(i), "clip float bounds": ops.clip(i, 0.5, 2.5),
        "bool clip": ops.clip(b, 0.5, None), "mse_loss": ops.mse_loss(i, Tensor([0, 0, 0])),
        "mse_loss none": ops.mse_loss(i, np.zeros(3), "none"), "bool mse_loss": ops.mse_loss(b, b),
        "dropout": ops.dropout(i, 0.5), "dropout eval": ops.dropout(i, 0.5, training=False),
    }
    assert {k: str(v.dtype) for k, v in floating.items()} == {k: "float32" for k in floating}
    np.testing.assert_allclose((i / 2).data, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(floating["mse_loss"].data, 14 / 3, rtol=1e-6)
    kept = ops.dropout(Tensor(np.full(100, 10)), 0.3, rng=np.random.default_rng(0)).data
    assert (kept == 0).any() and kept.dtype == np.float32
    np.testing.assert_allclose(kept[kept != 0], 10 / 0.7, rtol=1e-6)  # scaled by 1/(1-p), not int(1/(1-p))
    integral = {"int + int": i + 1, "int * bool": i * b[0], "sum": i.sum(), "int ** int": i ** 2, "neg": -i}
    assert {k: str(v.dtype) for k, v in integral.items()} == {k: "int64" for k in integral}


def test_padding_an_integer_tensor_with_a_float_gives_float32_not_truncated_integers():
    i = Tensor([1, 2, 3])
    for value in (0.5, np.float64(0.5)):
        padded = ops.pad(i, 1, value=value)
        assert padded.dtype == np.float32
        np.testing.assert_array_equal(padded.data, [0.5, 1, 2, 3, 0.5])
    assert ops.pad(i, 1).dtype == np.int64 and ops.pad(i, 1, value=-1).dtype == np.int64  # integers stay
    image = Tensor(np.arange(4).reshape(1, 1, 2, 2))
    cols = ops.unfold(image, 2, padding=1, pad_value=0.5)
    assert cols.dtype == np.float32 and cols.data[0, 0, 0] == 0.5
    assert ops.unfold(image, 2, padding=1).dtype == np.int64


def test_axes_out_of_range_are_refused_not_wrapped(rng):
    x = Tensor(rng.standard_normal((2, 3)))
    for bad in (lambda: x.unsqueeze(3), lambda: x.unsqueeze(-4), lambda: x.transpose(1, 2),
                lambda: x.transpose((2, 3)), lambda: x.swapaxes(0, 2), lambda: x.flatten(2), lambda: x.flatten(-3),
                lambda: nn.Flatten()(Tensor(np.ones(2)))):
        with pytest.raises(ValueError, match="out of range"):
            bad()
    assert x.unsqueeze(2).shape == (2, 3, 1) and x.unsqueeze(-3).shape == (1, 2, 3)
    assert x.transpose(-1, -2).shape == (3, 2)
    assert x.flatten(-2).shape == (6,) and x.flatten(1).shape == (2, 3) and Tensor(1.0).flatten().shape == (1,)


def test_softmax_mask_and_scale_are_checked(rng):
    x = Tensor(rng.standard_normal((2, 4, 4)).astype(np.float32), requires_grad=True)
    causal = np.tril(np.ones((4, 4), dtype=bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        ops.softmax(x, mask=causal.astype(np.int64))
    for bad in (np.ones((3, 4), bool), np.ones((2, 2, 4, 4), bool)):  # not broadcasting, or making x bigger
        with pytest.raises(ValueError, match="does not broadcast to"):
            ops.softmax(x, mask=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            ops.softmax(x, scale=bad)
    y = ops.softmax(x, scale=0.25, mask=causal)
    assert y.dtype == np.float32  # a Python float scale does not widen float32
    assert (y.data[:, np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]] == 0).all()
    np.testing.assert_allclose(y.data.sum(-1), 1, rtol=1e-6)
    (y * Tensor(rng.standard_normal((2, 4, 4)).astype(np.float32))).sum().backward()
    g = x.grad.data
    assert g.dtype == np.float32 and (g[:, ~causal] == 0).all() and (g[:, causal] != 0).sum() > 10


def test_softmax_gives_masked_entries_exactly_zero_gradient_as_where_does(rng):
    # a row with nothing left unmasked (a padding query) is NaN, as in PyTorch; its gradient, and that of
    # a masked entry beside an inf, is 0 as through where(mask, x, -inf), not 0 * NaN
    data = np.array([[1, 2, 3], [4, 5, 6], [np.inf, 0, 1]], np.float32)
    mask = np.array([[True, True, False], [False, False, False], [True, True, False]])
    for create_graph in (False, True):
        x = Tensor(data, requires_grad=True)
        with np.errstate(invalid="ignore"):  # numpy says so for -inf - -inf, as it did through where
            y = ops.softmax(x, -1, scale=0.5, mask=mask)
        assert np.isnan(y.data[1]).all() and not np.isnan(y.data[0]).any()
        (gx,) = grad(y[0].sum() + y[1].sum() * 0 + y[2, 2], [x], create_graph=create_graph)
        assert (gx.data[~mask] == 0).all() and gx.dtype == np.float32


def test_softmax_rows_out_of_exp_range_are_redone_shifted_and_leave_the_others_bitwise_alone(rng):
    # the last axis is normalized without subtracting each row's maximum while its exp sum is in range;
    # rows that overflow, underflow or hold a NaN are redone with the maximum subtracted
    import warnings

    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((6, 8, 16)) * 3).astype(dtype)
        extreme = x.copy()
        extreme[1, 2] = rng.standard_normal(16) + 500  # overflows exp
        extreme[2, 5] = rng.standard_normal(16) - 500  # every exp underflows to 0
        extreme[3, 0] = rng.standard_normal(16) - 30  # a small sum, still in range for float64 only
        extreme[4, 4, 3] = np.inf
        extreme[5, 7, 1] = np.nan
        for scale in (None, 0.5):
            with warnings.catch_warnings(), np.errstate(invalid="ignore"):  # inf - inf in the row with an inf
                warnings.simplefilter("error")  # but overflow along the way is not the user's business
                plain = ops.softmax(Tensor(x, dtype=dtype), -1, scale=scale).data
                mixed = ops.softmax(Tensor(extreme, dtype=dtype), -1, scale=scale).data
            assert mixed.dtype == dtype
            want = torch.softmax(torch.from_numpy(extreme) * (1.0 if scale is None else scale), -1).numpy()
            np.testing.assert_allclose(mixed, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-30)
            same = (extreme == x).all(axis=-1)
            assert (~same).sum() == 5
            np.testing.assert_array_equal(mixed[same], plain[same])  # the other rows' bits are untouched
    # with a mask: a row left with one large entry overflows alone, and is redone under the mask
    x = rng.standard_normal((3, 4, 4)).astype(np.float32)
    x[1, 0, 0] = 300
    causal = np.tril(np.ones((4, 4), dtype=bool))
    y = ops.softmax(Tensor(x), -1, scale=0.5, mask=causal).data
    want = torch.softmax((torch.from_numpy(x) * 0.5).masked_fill(~torch.from_numpy(causal), float("-inf")), -1)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-6, atol=1e-30)
    assert y[1, 0, 0] == 1 and (y[:, ~causal] == 0).all()


def test_integer_index_gradients_of_narrow_and_negative_indices(rng):
    x = Tensor(np.ones((200, 3), np.float32), requires_grad=True)
    x[np.array([-1, 5, -1], np.int8)].sum().backward()  # 200 does not fit int8: summed as intp
    want = np.zeros((200, 3), np.float32)
    want[199], want[5] = 2, 1
    np.testing.assert_array_equal(x.grad.data, want)


def test_layer_norm_and_linear_with_an_empty_feature_axis():
    x = Tensor(np.zeros((2, 0, 4), np.float32), requires_grad=True)
    w = Tensor(np.ones((0, 4), np.float32), requires_grad=True)
    y = ops.layer_norm(x, (0, 4), w, Tensor(np.zeros((0, 4), np.float32), requires_grad=True))
    assert y.shape == (2, 0, 4)
    y.sum().backward()
    assert x.grad.shape == (2, 0, 4) and w.grad.shape == (0, 4)
    gx, gw = grad(ops.layer_norm(x, (0, 4), w).sum(), [x, w], create_graph=True)  # as PyTorch: empty gradients
    assert gx.shape == (2, 0, 4) and gw.shape == (0, 4) and gx.dtype == gw.dtype == np.float32
    # 3-d input with no input features, and with no output features
    y = ops.linear(Tensor(np.zeros((2, 3, 0), np.float32)), Tensor(np.zeros((4, 0), np.float32)))
    assert y.shape == (2, 3, 4) and (y.data == 0).all()
    x = Tensor(np.ones((2, 3, 5), np.float32), requires_grad=True)
    ops.linear(x, Tensor(np.zeros((0, 5), np.float32))).sum().backward()
    assert x.grad.shape == (2, 3, 5) and (x.grad.data == 0).all()


def test_tensor_construction_defaults_to_float32():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.zeros(3)).dtype == np.float32
    assert Tensor(np.zeros(3), dtype=np.float64).dtype == np.float64
    assert Tensor([1, 2]).dtype == np.int64


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        Tensor([1, 2], requires_grad=True)


def test_in_place_assignment_into_graph_tensor_is_refused(rng):
    x = leaf((3,), rng)
    with pytest.raises(RuntimeError, match="in-place"):
        x[0] = 1.0
    with no_grad():
        x[0] = 1.0
    assert x.data[0] == 1.0


# --- in-place changes ------------------------------------------------------------------------------
#
# A tensor that an op saved for backward and that is then changed in place would give a wrong gradient;
# as in PyTorch, every tensor over the same data shares a version counter and backward refuses a change.


def _changed_in_place(fn):
    with pytest.raises(RuntimeError, match="changed in place"):
        fn()


def test_an_input_changed_in_place_after_use_is_refused(rng):
    w = leaf((3,), rng)
    x = Tensor(rng.standard_normal(3))
    y = (w * x).sum()
    x[0] = 100.0  # x needs no grad: the assignment is allowed, but Mul saved x
    _changed_in_place(y.backward)


def test_a_leaf_changed_under_no_grad_after_use_is_refused(rng):
    w = leaf((3,), rng)
    y = (w * w).sum()
    with no_grad():
        w[0] = 10.0
    _changed_in_place(y.backward)


def test_a_saved_output_changed_through_a_detached_alias_is_refused(rng):
    x = leaf((2,), rng)
    y = x.exp()  # Exp saves its output
    alias = y.detach()
    alias[0] = 0.0
    _changed_in_place(lambda: y.sum().backward())


def test_a_saved_input_changed_through_a_view_is_refused(rng):
    w = leaf((2, 3), rng)
    x = Tensor(rng.standard_normal((2, 3)))
    y = (w * x).sum()
    row = x[0]  # a numpy view of x's data: the change reaches x
    row[1] = 5.0
    _changed_in_place(y.backward)


def test_an_optimizer_step_between_forward_and_a_retained_backward_is_refused(rng):
    lin = nn.Linear(2, 2)
    opt = optim.SGD(lin.parameters(), lr=0.1)
    loss = lin(Tensor(rng.standard_normal((1, 2)))).sum()
    loss.backward(retain_graph=True)
    opt.step()  # the weights Linear saved are now other values
    _changed_in_place(loss.backward)


def test_changes_after_backward_or_to_unsaved_tensors_are_fine(rng):
    w = leaf((3,), rng)
    x = Tensor(rng.standard_normal(3))
    y = (w + x).sum()  # Add saves nothing
    x[0] = 7.0
    y.backward()
    np.testing.assert_array_equal(w.grad.data, np.ones(3, np.float32))
    z = (w * x).sum()
    z.backward()
    x[1] = 3.0  # after backward: nothing needs it any more
    with no_grad():
        w -= 0.1 * w.grad
    assert w._version[0] == 1


def test_in_place_operators_update_under_no_grad(rng):
    w = leaf((3,), rng)
    before = w.data.copy()
    data = w.data
    with no_grad():
        w -= 0.5
        w *= 2.0
        w += Tensor(np.ones(3, np.float32))
        w /= 4.0
    assert w.data is data and w.is_leaf and w.requires_grad  # the same tensor, changed in place
    np.testing.assert_allclose(w.data, ((before - 0.5) * 2 + 1) / 4, rtol=1e-6)
    assert w.data.dtype == np.float32


def test_in_place_operator_on_a_leaf_that_requires_grad_is_refused(rng):
    w = leaf((3,), rng)
    with pytest.raises(RuntimeError, match="no_grad"):
        w += 1.0


def test_in_place_operator_with_gradients_builds_a_new_tensor(rng):
    w = leaf((3,), rng)
    acc = Tensor(np.zeros(3, np.float32))
    acc += w * 2.0  # acc needs no grad but the right side does: the sum must stay differentiable
    y = w * 1.0
    y += w  # a non-leaf: y is rebound to y + w
    (acc.sum() + y.sum()).backward()
    np.testing.assert_array_equal(w.grad.data, np.full(3, 4.0, np.float32))


def test_in_place_operator_errors_name_the_problem():
    i = Tensor([1, 2, 3])
    with pytest.raises(TypeError, match="int64"):
        i /= 2
    x = Tensor(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        x += np.ones((2, 3), np.float32)


# --- hooks' results -----------------------------------------------------------------------------------


def test_a_hook_that_changes_the_gradient_dtype_or_shape_is_refused(rng):
    w = leaf((2, 3), rng)
    w.register_hook(lambda g: g.astype(np.float64))
    with pytest.raises(ValueError, match="float64"):
        (w * 2.0).sum().backward()
    v = leaf((2, 3), rng)
    y = v * 2.0
    y.register_hook(lambda g: g.sum(axis=0))
    with pytest.raises(ValueError, match=r"\[3\]"):
        y.sum().backward()
    u = leaf((2,), rng)
    u.register_hook(lambda g: g.tolist())
    with pytest.raises(TypeError, match="list"):
        u.sum().backward()


def test_an_op_whose_output_is_a_copy_does_not_share_the_version(rng):
    w = leaf((3, 4), rng)
    x = Tensor(rng.standard_normal((3, 4)))
    y = (w * x).sum()  # Mul saved x
    flat = x.transpose(1, 0).reshape(12)  # a copy: numpy sets .base on it all the same
    picked = x[:, [0, 2]]  # advanced indexing: a copy too
    with no_grad():
        flat[0] = 100.0
        picked -= 1.0
    y.backward()  # x itself is unchanged
    np.testing.assert_array_equal(w.grad.data, x.data)


def test_constants_that_backward_reads_are_the_ones_forward_used(rng):
    w = leaf((4, 3), rng)
    idx = Tensor(np.array([0, 1]))
    w[idx].sum().backward()
    idx[0] = 3  # after backward: harmless; and before it, see below
    expected = np.zeros((4, 3), np.float32)
    expected[[0, 1]] = 1
    np.testing.assert_array_equal(w.grad.data, expected)
    w.grad = None
    idx2 = Tensor(np.array([0, 1]))
    y = w[idx2].sum()
    idx2[0] = 3
    y.backward()
    np.testing.assert_array_equal(w.grad.data, expected)
    a = leaf((3,), rng)
    cond = Tensor(np.array([True, False, False]))
    z = ops.where(cond, a, 0.0).sum()
    cond[...] = True
    z.backward()
    np.testing.assert_array_equal(a.grad.data, [1.0, 0.0, 0.0])
    logits = leaf((2, 3), rng)
    target = np.array([0, 1])
    loss = ops.cross_entropy(logits, target)
    target[0] = 2
    loss.backward()
    p = np.exp(logits.data) / np.exp(logits.data).sum(-1, keepdims=True)
    p[[0, 1], [0, 1]] -= 1
    np.testing.assert_allclose(logits.grad.data, p / 2, rtol=1e-5, atol=1e-6)


def test_in_place_operator_with_gradients_keeps_shape_and_dtype(rng):
    y = leaf((3,), rng) * 1.0
    with pytest.raises(RuntimeError, match=r"keeps x's shape and dtype"):
        y += leaf((2, 3), rng)
    i = Tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="keeps x's shape and dtype"):
        i += leaf((3,), rng)


def test_updating_a_parameter_in_place_keeps_the_modules_order(rng):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = [n for n, _ in model.named_parameters()]
    model(Tensor(rng.standard_normal((4, 2)))).sum().backward()
    with no_grad():
        for layer in (model[0], model[1]):
            layer.weight -= 0.1 * layer.weight.grad  # rebinds layer.weight to the same Parameter
    assert [n for n, _ in model.named_parameters()] == before


def test_conv_and_pooling_whose_columns_are_the_input_itself_refuse_an_input_changed_in_place(rng):
    # a 1x1 convolution, or a window over the whole image, unfolds to a view of x: changing x after forward
    # must be caught, not give a gradient from the new values
    for kernel, size in ((1, 4), (3, 3)):
        x = Tensor(rng.standard_normal((2, 3, size, size)).astype(np.float32))
        w = Tensor(rng.standard_normal((5, 3, kernel, kernel)).astype(np.float32), requires_grad=True)
        y = ops.conv2d(x, w)
        with no_grad():
            x += 100.0
        with pytest.raises(RuntimeError, match="changed in place"):
            y.sum().backward()
    h0 = Tensor(rng.standard_normal((1, 1, 3, 3)).astype(np.float32), requires_grad=True)
    h = h0 * 1
    y = ops.max_pool2d(h, 3, stride=1)
    with no_grad():
        h[0, 0, 0, 0] = 100.0
    with pytest.raises(RuntimeError, match="changed in place"):
        y.sum().backward()
    # a window that does not cover the image copies: nothing to refuse
    x = Tensor(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    w = Tensor(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), requires_grad=True)
    y = ops.conv2d(x, w)
    with no_grad():
        x += 100.0
    y.sum().backward()


def test_assigning_a_tensor_that_requires_grad_is_refused_not_silently_cut_off():
    w = Tensor([3.0], requires_grad=True)
    buf = Tensor(np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="would drop its gradient"):
        buf[0:1] = w * 2
    buf[0:1] = (w * 2).detach()  # what the message offers
    with no_grad():
        buf[1:2] = w * 3
    np.testing.assert_array_equal(buf.data, [6.0, 9.0])


def test_gelu_and_erf_on_0d_and_float16_tensors():
    torch = pytest.importorskip("torch")
    for approximate in ("none", "tanh"):
        x = Tensor(0.7, requires_grad=True)
        y = ops.gelu(x, approximate=approximate)
        y.backward()
        xt = torch.tensor(0.7, dtype=torch.float32, requires_grad=True)
        torch.nn.functional.gelu(xt, approximate=approximate).backward()
        assert y.shape == () and x.grad.shape == ()
        np.testing.assert_allclose(y.data, torch.nn.functional.gelu(xt, approximate=approximate).item(), rtol=1e-6)
        np.testing.assert_allclose(x.grad.data, xt.grad.item(), rtol=1e-5)
        h = Tensor(np.array([-1.0, 0.5, 2.0], np.float16), requires_grad=True, dtype=np.float16)
        out = ops.gelu(h, approximate=approximate)
        out.sum().backward()
        assert out.dtype == np.float16 and h.grad.dtype == np.float16
    h = Tensor(np.array([-1.0, 0.5], np.float16), dtype=np.float16)
    assert ops.erf(h).dtype == np.float16


def test_grad_of_an_input_listed_twice_is_given_for_each():
    x = Tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True)
    gx, again = grad((x * x).sum(), [x, x])
    np.testing.assert_array_equal(gx.data, [2, 4, 6])
    np.testing.assert_array_equal(again.data, [2, 4, 6])
    gx.data[0] = 0  # each is its own array
    assert again.data[0] == 2
    y = x * 2  # a non-leaf, twice, with create_graph
    a, b = grad((y * y).sum(), [y, x, y], create_graph=True)[::2]
    np.testing.assert_array_equal(a.data, [4, 8, 12])
    np.testing.assert_array_equal(b.data, [4, 8, 12])


def test_init_functions_count_as_in_place_changes():
    from distbp.nn import init

    for fill in (lambda w: init.normal_(w), lambda w: init.constant_(w, 0.5), lambda w: init.zeros_(w)):
        lin = nn.Linear(3, 2)
        x = Tensor(np.ones((1, 3), np.float32), requires_grad=True)
        y = lin(x)
        fill(lin.weight)
        with pytest.raises(RuntimeError, match="changed in place"):
            y.sum().backward()


def test_softmax_and_exact_gelu_keep_float16_accurate():
    # softmax's unshifted path is for float32/64 (float16's exps go subnormal), and gelu's 1 + erf(x) would
    # cancel for negative x in float16
    x = np.linspace(-15, -9, 64 * 8).reshape(8, 64).astype(np.float16)
    exact = np.exp(x.astype(np.float64) - x.astype(np.float64).max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    got = ops.softmax(Tensor(x, dtype=np.float16), -1).data
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, exact, rtol=2e-3, atol=1e-6)
    from scipy.special import erfc

    h = np.array([-3.5, -3.0, -2.5, -1.0, 0.5, 2.0], np.float16)
    want = 0.5 * h.astype(np.float64) * erfc(-h.astype(np.float64) / np.sqrt(2))
    np.testing.assert_allclose(ops.gelu(Tensor(h, dtype=np.float16)).data, want, rtol=2e-3)


def test_gelu_gradient_of_large_float16_inputs_is_finite():
    for approximate in ("tanh", "none"):
        x = Tensor(np.array([-300.0, -20.0, 20.0, 300.0], np.float16), requires_grad=True, dtype=np.float16)
        ops.gelu(x, approximate=approximate).sum().backward()
        assert x.grad.dtype == np.float16
        np.testing.assert_array_equal(x.grad.data, [0, 0, 1, 1])  # the slope saturates at 0 and 1


def test_float16_sums_along_an_axis_accumulate_in_float32():
    # a float16 running sum stalls: 0.01 added 10000 times stops at 32 (the answer is 100)
    tiny = np.full((10000, 3), 0.01, np.float16)

    def assert_hundred(a):
        np.testing.assert_allclose(a, 100, rtol=1e-2)

    total = ops.sum(Tensor(tiny, dtype=np.float16), axis=0)
    assert total.dtype == np.float16
    assert_hundred(total.data)
    b = Tensor(np.zeros(3), requires_grad=True, dtype=np.float16)  # a broadcast gradient: the engine's sum_to
    (Tensor(np.zeros((10000, 3)), dtype=np.float16) + b).backward(tiny)
    assert b.grad.dtype == np.float16
    assert_hundred(b.grad.data)
    lin = nn.Linear(2, 3).to(np.float16)
    lin(Tensor(np.zeros((10000, 2)), dtype=np.float16)).backward(tiny)
    assert_hundred(lin.bias.grad.data)
    conv = nn.Conv2d(1, 3, 1).to(np.float16)
    conv(Tensor(np.zeros((10000, 1, 1, 1)), dtype=np.float16)).backward(tiny.reshape(10000, 3, 1, 1))
    assert_hundred(conv.bias.grad.data)


def test_float16_mean_of_more_than_65504_elements_has_a_gradient():
    # the count is inf in float16, and g / inf is 0
    for create_graph in (False, True):
        x = Tensor(np.ones((70000, 2)), requires_grad=True, dtype=np.float16)
        (gx,) = grad(x.mean(axis=0).sum(), [x], create_graph=create_graph)
        assert gx.dtype == np.float16
        np.testing.assert_allclose(gx.data.astype(np.float32), 1 / 70000, rtol=1e-2)


def test_float16_var_is_computed_in_float32_forward_and_backward():
    values = np.arange(10) * 50.0  # var 20625, but the sum of squared deviations is past float16's largest
    want = values.var()
    for create_graph in (False, True):
        x = Tensor(values, requires_grad=True, dtype=np.float16)
        v = x.var()
        assert v.dtype == np.float16
        np.testing.assert_allclose(float(v.data), want, rtol=1e-3)
        (gx,) = grad(v, [x], grad_outputs=[Tensor(1000.0, dtype=np.float16)], create_graph=create_graph)
        assert gx.dtype == np.float16  # 1000 * (x - mean) overflows float16; the gradient, 200 * (x - mean), does not
        np.testing.assert_allclose(gx.data.astype(np.float64), 1000 * 2 * (values - values.mean()) / 10, rtol=1e-3)
