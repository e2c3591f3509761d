"""distbp.nn: Module bookkeeping, every layer against its torch twin, initialisation and gradient clipping.

PyTorch is the oracle: each layer gets the same weights copied in, then outputs, input gradients and
parameter gradients must agree.
"""

import contextlib
import math
import re

import numpy as np
import pytest

import distbp
from distbp import Tensor, nn, optim
from distbp.models import CharLM
from distbp.nn import init

torch = pytest.importorskip("torch", reason="PyTorch is the test oracle; install with pip install -e '.[test]'")

RTOL = ATOL = 1e-5


# --- helpers ---------------------------------------------------------------------------------------


def t2n(t):
    return t.detach().cpu().numpy()


def copy_into_torch(dmod, tmod, name_map=None):
    """Copy every torch parameter's value from the distbp parameter of the (mapped) same name."""
    name_map = name_map or {}
    dparams = dict(dmod.named_parameters())
    tnames = [n for n, _ in tmod.named_parameters()]
    assert len(tnames) == len(dparams), (tnames, list(dparams))
    with torch.no_grad():
        for tname, tp in tmod.named_parameters():
            dp = dparams[name_map.get(tname, tname)]
            assert tuple(tp.shape) == dp.shape, (tname, tp.shape, dp.shape)
            tp.copy_(torch.from_numpy(dp.data.copy()))


def compare_with_torch(dmod, tmod, x, *, name_map=None, rtol=RTOL, atol=ATOL, input_grad=True, seed=0):
    """Run both modules on x, backprop the same random cotangent, compare outputs and all gradients."""
    name_map = name_map or {}
    copy_into_torch(dmod, tmod, name_map)
    xd = Tensor(x, requires_grad=input_grad, dtype=x.dtype)
    yd = dmod(xd)
    cot = np.random.default_rng(seed).standard_normal(yd.shape).astype(np.float32)
    (yd * Tensor(cot)).sum().backward()

    xt = torch.from_numpy(x.copy())
    if input_grad:
        xt.requires_grad_(True)
    yt = tmod(xt)
    (yt * torch.from_numpy(cot)).sum().backward()

    assert yd.shape == tuple(yt.shape)
    assert yd.dtype == np.float32
    np.testing.assert_allclose(yd.data, t2n(yt), rtol=rtol, atol=atol, err_msg="forward output")
    if input_grad:
        np.testing.assert_allclose(xd.grad.data, t2n(xt.grad), rtol=rtol, atol=atol, err_msg="input gradient")
    dparams = dict(dmod.named_parameters())
    for tname, tp in tmod.named_parameters():
        dp = dparams[name_map.get(tname, tname)]
        assert dp.grad is not None, f"{tname} got no gradient"
        assert dp.grad.data.dtype == np.float32
        np.testing.assert_allclose(dp.grad.data, t2n(tp.grad), rtol=rtol, atol=atol, err_msg=f"grad of {tname}")
    return yd, yt


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- Module: registration and traversal --------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.ones(3, np.float32))
        self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        self.heads = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 1, bias=False)])
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.body(x) * self.scale
        return [head(self.act(h)) for head in self.heads]


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        self.heads = torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(3, 1, bias=False)])
        self.act = torch.nn.Tanh()


def test_named_parameters_custom_module_names_and_order():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == [
        "scale",
        "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
        "heads.0.weight", "heads.0.bias", "heads.1.weight",
    ]
    assert names == [n for n, _ in TorchNet().named_parameters()]
    # parameters() is the same objects in the same order
    assert [id(p) for p in net.parameters()] == [id(p) for _, p in net.named_parameters()]
    assert net.body[0].weight is dict(net.named_parameters())["body.0.weight"]
    assert net.num_parameters() == 3 + (4 * 5 + 5) + (5 * 3 + 3) + (3 * 2 + 2) + 3
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())


def _nested_pair():
    d = nn.Sequential(
        nn.Linear(2, 3),
        nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3))),
        nn.Linear(3, 1),
    )
    t = torch.nn.Sequential(
        torch.nn.Linear(2, 3),
        torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(3, 3))),
        torch.nn.Linear(3, 1),
    )
    return d, t


def test_named_parameters_nested_names_are_dotted_paths():
    d, t = _nested_pair()
    assert sorted(n for n, _ in d.named_parameters()) == sorted(n for n, _ in t.named_parameters())
    assert sorted(d.state_dict()) == sorted(t.state_dict())


def test_named_parameters_nested_order_matches_torch():
    d, t = _nested_pair()
    expected = ["0.weight", "0.bias", "1.0.weight", "1.0.bias", "1.2.0.weight", "1.2.0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in t.named_parameters()] == expected
    assert [n for n, _ in d.named_parameters()] == expected


def test_named_modules_order_matches_torch():
    d, t = _nested_pair()
    assert [n for n, _ in d.named_modules()] == [n for n, _ in t.named_modules()]


def test_shared_parameter_counted_once_and_gradients_accumulate(rng):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    class TorchTied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    d, t = Tied(), TorchTied()
    assert [n for n, _ in d.named_parameters()] == [n for n, _ in t.named_parameters()] == ["emb.weight"]
    assert len(list(d.parameters())) == 1
    assert d.num_parameters() == 40
    assert list(d.state_dict()) == list(t.state_dict()) == ["emb.weight", "head.weight"]  # each name, as torch

    idx = rng.integers(0, 10, size=(3, 5))
    copy_into_torch(d, t)
    yd = d(Tensor(idx))
    cot = randn(rng, *yd.shape)
    (yd * Tensor(cot)).sum().backward()
    yt = t(torch.from_numpy(idx))
    (yt * torch.from_numpy(cot)).sum().backward()
    np.testing.assert_allclose(yd.data, t2n(yt), rtol=RTOL, atol=ATOL)
    # the tied weight's gradient is the sum over both uses
    np.testing.assert_allclose(d.emb.weight.grad.data, t2n(t.emb.weight.grad), rtol=RTOL, atol=ATOL)


def test_module_reused_twice_counted_once():
    lin = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(seq.parameters())) == 2
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    # an optimizer over them accepts the de-duplicated list
    optim.SGD(seq.parameters(), lr=0.1)


def test_reassigning_and_deleting_attributes_updates_registration():
    m = nn.Module()
    m.a = nn.Parameter(np.zeros(2, np.float32))
    m.sub = nn.Linear(2, 2)
    assert [n for n, _ in m.named_parameters()] == ["a", "sub.weight", "sub.bias"]
    m.a = nn.Linear(1, 1)  # a parameter slot replaced by a module (torch refuses this; distbp re-registers)
    assert sorted(n for n, _ in m.named_parameters()) == ["a.bias", "a.weight", "sub.bias", "sub.weight"]
    del m.sub
    assert [n for n, _ in m.named_parameters()] == ["a.weight", "a.bias"]
    m.plain = np.zeros(3)  # plain attributes are not state
    assert "plain" not in m.state_dict()


def test_a_registered_name_keeps_its_kind():
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        lin.weight = Tensor(np.zeros((2, 3), np.float32), requires_grad=True)
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    m = nn.Module()
    m.register_buffer("scale", np.ones(2, np.float32))
    m.scale = np.full(2, 5.0, np.float32)  # a buffer stays a buffer, with the new value
    np.testing.assert_array_equal(dict(m.named_buffers())["scale"], [5.0, 5.0])
    assert "scale" in m.state_dict()
    m.sub = nn.Linear(1, 1)
    with pytest.raises(TypeError, match="submodule 'sub'"):
        m.sub = 3


def test_setattr_before_super_init_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1, np.float32))
            super().__init__()

    with pytest.raises(RuntimeError, match="super"):
        Bad()


def test_register_parameter_rejects_plain_tensor():
    m = nn.Module()
    with pytest.raises(TypeError, match="w"):
        m.register_parameter("w", Tensor(np.zeros(2, np.float32)))


# --- Module: modes and gradients ---------------------------------------------------------------------


def test_train_eval_propagate_and_return_self():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.5), nn.TransformerBlock(8, 2, dropout=0.1)))
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert all(not m.training for m in net.modules())
    assert net.train() is net
    assert all(m.training for m in net.modules())
    net.train(False)
    assert not net[1][1].attn.attn_dropout.training


@pytest.mark.parametrize("mode", ["False", 0, None])
def test_train_refuses_a_mode_that_is_not_a_bool(mode):
    net = nn.Sequential(nn.Dropout(0.5)).eval()
    with pytest.raises(ValueError, match="mode must be a bool"):
        net.train(mode)
    assert not net[0].training
    assert net.train(np.bool_(True))[0].training


def test_apply_visits_children_before_parents_like_torch():
    def build(m):
        shared = m.Linear(1, 1)
        return m.Sequential(shared, m.Sequential(m.ReLU(), m.Tanh()), shared)

    def order(net):
        seen = {}  # torch visits a shared module each time it is reached, distbp once: compare first visits
        net.apply(lambda mod: seen.setdefault(id(mod), type(mod).__name__))
        return list(seen.values())

    assert order(build(nn)) == order(build(torch.nn)) == ["Linear", "ReLU", "Tanh", "Sequential", "Sequential"]


def test_repr_matches_torch_layout():
    pairs = [
        (nn.CrossEntropyLoss(reduction="sum", ignore_index=3), "CrossEntropyLoss(reduction='sum', ignore_index=3)"),
        (nn.MSELoss("sum"), "MSELoss(reduction='sum')"),
        (nn.GELU("tanh"), repr(torch.nn.GELU("tanh"))),
        (nn.Identity(), repr(torch.nn.Identity())),
        (nn.Sequential(nn.Linear(2, 3), nn.Sequential()), repr(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential()))),
    ]
    for module, expected in pairs:
        assert repr(module) == expected
    lines = repr(nn.CausalSelfAttention(4, 2)).splitlines()
    assert lines[:3] == ["CausalSelfAttention(", "  d_model=4, n_heads=2",
                         "  (qkv): Linear(in_features=4, out_features=12, bias=True)"]
    assert lines[-1] == ")"


def test_eval_disables_dropout_in_children(rng):
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5))
    x = Tensor(randn(rng, 20, 6))
    net.eval()
    a, b = net(x).data, net(x).data
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, net[0](x).data)
    net.train()
    c = net(x).data
    assert (c == 0).sum() > 0
    assert not np.array_equal(c, a)


def test_zero_grad(rng):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net(Tensor(randn(rng, 5, 3))).sum().backward()
    assert all(p.grad is not None and np.any(p.grad.data != 0) for p in net.parameters())
    arrays = [p.grad.data for p in net.parameters()]
    net.zero_grad(set_to_none=False)
    for p, arr in zip(net.parameters(), arrays):
        assert p.grad.data is arr  # zeroed in place, not reallocated
        assert not np.any(arr)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    # gradients accumulate from fresh after zero_grad
    x = Tensor(randn(rng, 5, 3))
    net(x).sum().backward()
    g1 = [p.grad.data.copy() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    for p, g in zip(net.parameters(), g1):
        np.testing.assert_array_equal(p.grad.data, g)


# --- Module: state_dict ------------------------------------------------------------------------------


def _model(seed):
    distbp.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))


def test_state_dict_keys_values_and_copies():
    m = _model(0)
    sd = m.state_dict()
    assert list(sd) == [n for n, _ in m.named_parameters()]
    for name, p in m.named_parameters():
        assert isinstance(sd[name], np.ndarray)
        np.testing.assert_array_equal(sd[name], p.data)
        assert sd[name].dtype == np.float32
        assert not np.shares_memory(sd[name], p.data)
    before = m[0].weight.data.copy()
    sd["0.weight"][...] = 123.0
    np.testing.assert_array_equal(m[0].weight.data, before)


def test_state_dict_round_trip(rng):
    a, b = _model(0), _model(1)
    x = Tensor(randn(rng, 5, 4))
    assert not np.allclose(a(x).data, b(x).data)
    params_before = {n: p for n, p in b.named_parameters()}
    missing, unexpected = b.load_state_dict(a.state_dict())
    assert missing == [] and unexpected == []
    np.testing.assert_array_equal(a(x).data, b(x).data)
    for n, p in b.named_parameters():
        assert p is params_before[n]  # loaded in place: optimizers holding them stay valid
        np.testing.assert_array_equal(p.data, a.state_dict()[n])


def test_load_torch_state_dict_into_same_named_model(rng):
    t = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    d = _model(0)
    d.load_state_dict({k: t2n(v) for k, v in t.state_dict().items()})
    x = randn(rng, 5, 4)
    np.testing.assert_allclose(d(Tensor(x)).data, t2n(t(torch.from_numpy(x))), rtol=RTOL, atol=ATOL)


def test_persistent_and_non_persistent_buffers():
    m = nn.Linear(2, 2)
    m.register_buffer("running", np.arange(3, dtype=np.float32))
    m.register_buffer("scratch", np.zeros(3, np.float32), persistent=False)
    sd = m.state_dict()
    assert list(sd) == ["weight", "bias", "running"]
    sd["running"] = np.full(3, 7, np.float32)
    m2 = nn.Linear(2, 2)
    m2.register_buffer("running", np.zeros(3, np.float32))
    m2.load_state_dict(sd)
    np.testing.assert_array_equal(m2.running, np.full(3, 7, np.float32))


@pytest.mark.parametrize("name", ["weight", "bias", "forward", "training"])
def test_register_buffer_refuses_a_name_already_taken(name):
    lin = nn.Linear(3, 2)
    with pytest.raises(KeyError, match=f"attribute '{name}' already exists"):
        lin.register_buffer(name, np.zeros(1, np.float32))
    assert list(lin.state_dict()) == ["weight", "bias"] and lin.state_dict()["weight"].shape == (2, 3)
    seq = nn.Sequential(nn.ReLU())
    with pytest.raises(KeyError, match="'0' already exists"):
        seq.register_buffer("0", np.zeros(1, np.float32))


def test_register_buffer_refuses_bad_names_and_values():
    m = nn.Module()
    for name in ("", "a.b"):
        with pytest.raises(KeyError, match="non-empty and contain no '.'"):
            m.register_buffer(name, np.zeros(1, np.float32))
    with pytest.raises(TypeError, match="must be a str, not int"):
        m.register_buffer(1, np.zeros(1, np.float32))
    with pytest.raises(TypeError, match="'x' must be an array, a Tensor or None, not list"):
        m.register_buffer("x", [1.0])
    m.register_buffer("x", np.zeros(1, np.float32))
    m.register_buffer("x", np.ones(2, np.float32))  # re-registering a buffer replaces it
    np.testing.assert_array_equal(m.x, [1, 1])


def test_none_buffer_stays_out_of_state_dict_until_it_holds_an_array():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("mask", None)

    m = WithMask()
    sd = m.state_dict()
    assert list(sd) == ["lin.weight", "lin.bias"] and list(m.named_buffers()) == []
    assert m.load_state_dict(sd) == ([], [])
    m.mask = np.ones(2, np.float32)  # the placeholder filled in: now it is state
    assert list(m.state_dict()) == ["lin.weight", "lin.bias", "mask"]
    with pytest.raises(KeyError, match=r"unexpected \['mask'\]"):
        WithMask().load_state_dict(m.state_dict())


def test_to_casts_parameters_and_every_floating_buffer_and_refuses_other_dtypes():
    m = nn.Linear(2, 2)
    m.register_buffer("scale", Tensor(np.ones(2, np.float32)))
    m.register_buffer("running", np.zeros(2, np.float32))
    m.register_buffer("counts", np.zeros(2, np.int64))
    scale, weight = m.scale, m.weight
    assert m.to(np.float64) is m
    assert m.scale is scale and m.weight is weight  # in place: an optimizer's references stay valid
    assert {n: str(b.dtype) for n, b in m.named_buffers()} == {"scale": "float64", "running": "float64",
                                                               "counts": "int64"}
    y = m(Tensor(np.ones((1, 2)), dtype=np.float64)) * m.scale
    assert y.dtype == np.float64
    for bad in (np.int64, bool, np.complex64):
        with pytest.raises(TypeError, match="must be floating point"):
            m.to(bad)
    assert m.weight.dtype == np.float64


def _assert_unchanged(model, snapshot):
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, snapshot[name], err_msg=f"{name} was modified by a failed load")


def _bad_state(base, good_from):
    """A state that would change every parameter (values from good_from) before the bad entry is reached."""
    sd = good_from.state_dict()
    assert not np.array_equal(sd["0.weight"], base.state_dict()["0.weight"])
    return sd


def test_load_state_dict_missing_key_error_and_atomic():
    m, other = _model(0), _model(1)
    snap = m.state_dict()
    sd = _bad_state(m, other)
    del sd["3.bias"]
    with pytest.raises(KeyError, match=r"missing.*3\.bias"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


def test_load_state_dict_unexpected_key_error_and_atomic():
    m, other = _model(0), _model(1)
    snap = m.state_dict()
    sd = _bad_state(m, other)
    sd["9.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(KeyError, match=r"unexpected.*9\.weight"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


def test_load_state_dict_wrong_shape_error_and_atomic():
    m, other = _model(0), _model(1)
    snap = m.state_dict()
    sd = _bad_state(m, other)
    sd["3.weight"] = np.zeros((3, 9), np.float32)  # last entry: everything before it is valid
    with pytest.raises(ValueError, match=r"3\.weight.*\(3, 9\).*\(3, 8\)"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


def test_load_state_dict_wrong_dtype_error_and_atomic():
    m, other = _model(0), _model(1)
    snap = m.state_dict()
    sd = _bad_state(m, other)
    sd["3.bias"] = sd["3.bias"].astype(np.complex64)  # no float holds it
    with pytest.raises(TypeError, match=r"3\.bias.*complex64.*float32"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)
    assert all(p.data.dtype == np.float32 for p in m.parameters())


def test_load_state_dict_converts_float64_and_python_numbers_into_the_models_dtype():
    # as PyTorch copies: a float64 state (numpy, scipy, a model.to(np.float64) run) loads; the model stays float32
    m, other = _model(0), _model(1)
    params = dict(m.named_parameters())
    sd = {k: v.astype(np.float64) for k, v in other.state_dict().items()}
    assert m.load_state_dict(sd) == ([], [])
    for name, p in m.named_parameters():
        assert p is params[name] and p.data.dtype == np.float32
        np.testing.assert_array_equal(p.data, sd[name].astype(np.float32))
    scalar = nn.Module()
    scalar.t = nn.Parameter(np.float32(0.0))
    scalar.load_state_dict({"t": 2.5})
    assert scalar.t.data.dtype == np.float32 and scalar.t.data == 2.5


def test_load_state_dict_into_a_read_only_buffer_is_refused_before_anything_changes():
    m, other = _model(0), _model(1)
    snap = m.state_dict()
    m.register_buffer("table", np.broadcast_to(np.float32(0), (3,)))  # read-only, and registered last
    sd = {**other.state_dict(), "table": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="the model's table is read-only"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


def test_load_state_dict_non_strict_reports_and_loads_the_rest():
    m, other = _model(0), _model(1)
    sd = other.state_dict()
    del sd["3.bias"]
    sd["extra"] = np.zeros(1, np.float32)
    bias_before = m[3].bias.data.copy()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["3.bias"] and unexpected == ["extra"]
    np.testing.assert_array_equal(m[0].weight.data, other[0].weight.data)
    np.testing.assert_array_equal(m[3].bias.data, bias_before)
    # shape errors stay errors when not strict
    sd["0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"0\.bias"):
        m.load_state_dict(sd, strict=False)


# --- layers against torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, bias):
    compare_with_torch(nn.Linear(7, 5, bias=bias), torch.nn.Linear(7, 5, bias=bias), randn(rng, 2, 3, 7))


def test_linear_with_zero_in_features_matches_torch(rng):
    with pytest.warns(UserWarning, match="zero-element"):
        d = nn.Linear(0, 3)
    with pytest.warns(UserWarning, match="zero-element"):
        t = torch.nn.Linear(0, 3)
    yd, _ = compare_with_torch(d, t, randn(rng, 2, 0))
    np.testing.assert_array_equal(yd.data, np.zeros((2, 3), np.float32))  # the bias: U(-0, 0)
    with pytest.warns(UserWarning, match="zero-element"):
        assert nn.Linear(np.int64(3), 0)(Tensor(randn(rng, 2, 3))).shape == (2, 0)


@pytest.mark.parametrize("args,match", [
    ((0, 2, 3), "in_channels must be an integer >= 1, got 0"),
    ((3, 0, 3), "out_channels must be an integer >= 1, got 0"),
    ((3.0, 2, 3), "in_channels must be an integer >= 1, got 3.0"),
    ((3, 4, 0), r"kernel \(0, 0\) and stride \(1, 1\) must be positive"),
    ((3, 4, (3, 0)), r"kernel \(3, 0\)"),
    ((3, 2, (3, 3, 3)), r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    ((3, 2, 2.5), "kernel_size must be an int or a pair of ints"),
    ((3, 2, 3, 0), r"stride \(0, 0\) must be positive"),
    ((3, 2, 3, 1, -1), r"padding \(-1, -1\) non-negative"),
    ((3, 2, 3, None), "stride must be an int or a pair of ints, not None"),  # pooling's None means the kernel
], ids=["in0", "out0", "in-float", "kernel0", "kernel-3x0", "kernel-3d", "kernel-float", "stride0", "padding-neg",
        "stride-none"])
def test_conv2d_refuses_bad_sizes(args, match):
    with pytest.raises(ValueError, match="Conv2d: .*" + match):
        nn.Conv2d(*args)


def test_conv2d_takes_numpy_integer_sizes(rng):
    d = nn.Conv2d(np.int64(3), np.int32(4), np.int64(3), stride=np.int64(2))
    t = torch.nn.Conv2d(3, 4, 3, stride=2)
    assert d.kernel_size == (3, 3) and type(d.kernel_size[0]) is int and type(d.in_channels) is int
    compare_with_torch(d, t, randn(rng, 2, 3, 9, 8), **CONV_TOL)
    with pytest.raises(ValueError, match="no output channels"):
        distbp.autograd.ops.conv2d(Tensor(randn(rng, 1, 3, 5, 5)), Tensor(randn(rng, 0, 3, 3, 3)))


def test_linear_default_init_bounds():
    distbp.manual_seed(0)
    lin = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)  # torch's kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for p in (lin.weight, lin.bias):
        assert p.data.dtype == np.float32
        assert np.abs(p.data).max() <= bound
        assert np.abs(p.data).max() > 0.95 * bound
    np.testing.assert_allclose(lin.weight.data.std(), bound / math.sqrt(3), rtol=0.02)


# Conv: im2col + matmul sums C*kh*kw products in a different order from torch's conv kernel, so float32
# rounding differs. Measured worst error here is < 2.5e-6, so the default 1e-5 holds; if another BLAS or
# CPU path trips it, loosen this (and only this) to ~1e-4 rather than RTOL/ATOL.
CONV_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [(3, 1, 0), (3, 1, 1), (3, 2, 1), ((3, 2), 2, 0), (5, 3, 2), ((2, 3), (2, 1), (1, 0))],
)
def test_conv2d(rng, kernel, stride, padding):
    d = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)
    t = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)
    yd, _ = compare_with_torch(d, t, randn(rng, 2, 3, 9, 8), **CONV_TOL)
    assert d.weight.shape == tuple(t.weight.shape)


def test_conv2d_without_bias(rng):
    compare_with_torch(nn.Conv2d(2, 3, 3, bias=False), torch.nn.Conv2d(2, 3, 3, bias=False), randn(rng, 1, 2, 6, 6),
                       **CONV_TOL)


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1), ((2, 3), (1, 2), 0)])
def test_max_pool2d(rng, kernel, stride, padding):
    # continuous random input: no ties, so the gradient's routing is unambiguous
    compare_with_torch(nn.MaxPool2d(kernel, stride, padding), torch.nn.MaxPool2d(kernel, stride, padding),
                       randn(rng, 2, 3, 7, 8))


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1), ((2, 3), (1, 2), 0)])
def test_avg_pool2d(rng, kernel, stride, padding):
    # torch's default count_include_pad=True is what distbp documents
    compare_with_torch(nn.AvgPool2d(kernel, stride, padding), torch.nn.AvgPool2d(kernel, stride, padding),
                       randn(rng, 2, 3, 7, 8))


def test_pool_even_tiling_fast_path(rng):
    x = randn(rng, 2, 3, 8, 8)
    compare_with_torch(nn.MaxPool2d(2), torch.nn.MaxPool2d(2), x)
    compare_with_torch(nn.AvgPool2d(4), torch.nn.AvgPool2d(4), x)


@pytest.mark.parametrize("start", [1, 2])
def test_flatten(rng, start):
    compare_with_torch(nn.Flatten(start), torch.nn.Flatten(start), randn(rng, 2, 3, 4, 5))


def test_flatten_of_an_empty_batch():
    assert nn.Flatten()(Tensor(np.zeros((0, 3, 2, 2), np.float32))).shape == (0, 12)


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_pooling_padding_over_half_the_kernel_is_refused(rng, pool):
    with pytest.raises(ValueError, match="at most half the kernel"):
        pool(2, stride=2, padding=2)(Tensor(randn(rng, 1, 1, 4, 4)))
    with pytest.raises(ValueError, match="pair of ints"):
        pool(2.5)(Tensor(randn(rng, 1, 1, 4, 4)))


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
@pytest.mark.parametrize("kernel,stride,padding", [(0, None, 0), (2, 0, 0), ((2, 0), 1, 0), (2, 1, -1)])
def test_pooling_refuses_a_kernel_or_stride_below_one(rng, pool, kernel, stride, padding):
    with pytest.raises(ValueError, match="must be positive, padding .* non-negative"):
        pool(kernel, stride, padding)(Tensor(randn(rng, 1, 1, 4, 4)))
    assert f"stride={kernel if stride is None else stride}," in repr(pool(kernel, stride, padding))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint8, np.bool_])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (2, 2, 1), (2, None, 0)])
def test_max_pool2d_of_integers_keeps_the_dtype_with_or_without_padding(rng, dtype, kernel, stride, padding):
    x = rng.integers(0, 2 if dtype is np.bool_ else 100, (2, 3, 6, 6)).astype(dtype)
    y = nn.MaxPool2d(kernel, stride, padding)(Tensor(x, dtype=dtype))
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float32)), kernel, stride, padding)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.data, t2n(expected).astype(dtype))


@pytest.mark.parametrize(
    "make_d,make_t",
    [
        (nn.ReLU, torch.nn.ReLU),
        (nn.GELU, torch.nn.GELU),
        (lambda: nn.GELU("tanh"), lambda: torch.nn.GELU("tanh")),
        (nn.Tanh, torch.nn.Tanh),
        (nn.Sigmoid, torch.nn.Sigmoid),
        (nn.Identity, torch.nn.Identity),
    ],
    ids=["relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "identity"],
)
def test_activations(rng, make_d, make_t):
    x = randn(rng, 4, 50) * 3
    compare_with_torch(make_d(), make_t(), x)


@pytest.mark.parametrize("shape", [8, (4, 6)])
def test_layer_norm(rng, shape):
    d, t = nn.LayerNorm(shape), torch.nn.LayerNorm(shape)
    # non-trivial affine parameters, so their gradients are exercised
    d.weight.data[...] = 1 + 0.5 * randn(rng, *d.weight.shape)
    d.bias.data[...] = randn(rng, *d.bias.shape)
    x = randn(rng, 2, 3, 4, 6) * 2 + 1 if shape != 8 else randn(rng, 2, 5, 8) * 2 + 1
    compare_with_torch(d, t, x)


def test_layer_norm_refuses_mixed_dtypes(rng):
    d = nn.LayerNorm(4).to(np.float64)
    with pytest.raises(TypeError, match="float64 but the input is float32"):
        d(Tensor(randn(rng, 2, 4)))


@pytest.mark.parametrize("create_graph", [False, True])
def test_layer_norm_of_float16_keeps_its_statistics_in_float32(rng, create_graph):
    # a row of 768 values of size ~10 has a sum of squares past float16's largest (65504): it gave zeros
    x = (rng.standard_normal((2, 768)) * 10).astype(np.float16)
    w = (1 + 0.5 * rng.standard_normal(768)).astype(np.float16)
    b = rng.standard_normal(768).astype(np.float16)
    cot = rng.standard_normal((2, 768)).astype(np.float16)
    got, want = [], []
    for dtype, store in ((np.float16, got), (np.float64, want)):
        xs, ws, bs = (Tensor(a, requires_grad=True, dtype=dtype) for a in (x, w, b))
        y = distbp.autograd.ops.layer_norm(xs, 768, ws, bs)
        grads = distbp.autograd.grad(y, [xs, ws, bs], grad_outputs=[Tensor(cot, dtype=dtype)],
                                     create_graph=create_graph and dtype == np.float16)
        store += [y] + list(grads)
    for name, a, e in zip(("y", "x.grad", "w.grad", "b.grad"), got, want):
        assert a.dtype == np.float16, name
        np.testing.assert_allclose(a.data.astype(np.float64), e.data, rtol=1e-2, atol=2e-2, err_msg=name)


def test_layer_norm_without_affine(rng):
    d, t = nn.LayerNorm(8, elementwise_affine=False), torch.nn.LayerNorm(8, elementwise_affine=False)
    assert list(d.parameters()) == []
    compare_with_torch(d, t, randn(rng, 3, 8) * 4)


def test_embedding(rng):
    d, t = nn.Embedding(11, 6), torch.nn.Embedding(11, 6)
    idx = rng.integers(0, 11, size=(4, 7))
    idx[0, :3] = 2  # repeated rows: their gradients must add up
    copy_into_torch(d, t)
    yd = d(Tensor(idx))
    cot = randn(rng, *yd.shape)
    (yd * Tensor(cot)).sum().backward()
    yt = t(torch.from_numpy(idx))
    (yt * torch.from_numpy(cot)).sum().backward()
    np.testing.assert_array_equal(yd.data, t2n(yt))
    np.testing.assert_allclose(d.weight.grad.data, t2n(t.weight.grad), rtol=RTOL, atol=ATOL)
    with pytest.raises(IndexError, match="11"):
        d(Tensor(np.array([0, 11])))


def test_sequential_cnn_uses_torch_names(rng):
    def build(m):
        return m.Sequential(
            m.Conv2d(3, 4, 3, padding=1), m.ReLU(), m.MaxPool2d(2),
            m.Conv2d(4, 6, 3, stride=2, padding=1), m.Tanh(), m.AvgPool2d(2),
            m.Flatten(), m.Linear(6 * 2 * 2, 5), m.Sigmoid(),
        )

    d, t = build(nn), build(torch.nn)
    assert [n for n, _ in d.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert len(d) == 9 and isinstance(d[7], nn.Linear) and [type(m) for m in d][0] is nn.Conv2d
    compare_with_torch(d, t, randn(rng, 2, 3, 16, 16), **CONV_TOL)


def test_sequential_append_and_modulelist():
    s = nn.Sequential(nn.Linear(2, 3)).append(nn.ReLU()).append(nn.Linear(3, 1))
    assert len(s) == 3 and [n for n, _ in s.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    ml = nn.ModuleList([nn.Linear(1, 1)])
    ml.append(nn.Linear(1, 2))
    assert len(ml) == 2 and ml[1].out_features == 2 and ml[-1] is ml[1]
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("make", [lambda x: nn.Sequential(nn.Identity(), x), lambda x: nn.ModuleList([nn.ReLU(), x]),
                                  lambda x: nn.Sequential(nn.ReLU()).append(x)], ids=["Sequential", "ModuleList", "append"])
@pytest.mark.parametrize("value", [distbp.relu, None, 3], ids=["function", "None", "int"])
def test_containers_refuse_what_is_not_a_module(make, value):
    with pytest.raises(TypeError, match=f"item 1 must be a Module, not {type(value).__name__}"):
        make(value)
    with pytest.raises(TypeError, match="'f' must be a Module or None, not function"):
        nn.Module().add_module("f", distbp.relu)


def test_slicing_a_container_gives_a_container_of_the_same_kind():
    a, b, c = nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)
    s = nn.Sequential(a, b, c)
    head = s[0:2]
    assert type(head) is nn.Sequential and list(head) == [a, b]
    # the layers keep their names, as in PyTorch: the state_dict of a slice means the same layers
    assert [n for n, _ in s[1:].named_parameters()] == ["2.weight", "2.bias"]
    t = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    assert list(s[1:].state_dict()) == list(t[1:].state_dict())
    tail = s[1:].append(nn.Tanh())  # appended under a name of its own, not over "2"
    assert [n for n, _ in tail.named_children()] == ["1", "2", "3"] and tail[1] is c
    x = Tensor(np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(s[::1](x).data, s(x).data)
    ml = nn.ModuleList([a, b, c])[::-1]
    assert type(ml) is nn.ModuleList and list(ml) == [c, b, a]
    assert len(s[5:]) == 0 and s[-1] is c


def test_small_module_api_edges_behave_as_in_torch():
    from distbp.nn import init

    shared = nn.Linear(2, 2)
    assert len(list(nn.Sequential(shared, shared).children())) == 1  # as torch: one child, under its first name
    assert nn.MaxPool2d(2).stride == 2 and nn.MaxPool2d(3, 1).stride == 1
    assert nn.LayerNorm(np.int64(4)).normalized_shape == (4,)
    weights = np.ones(3, np.float32)
    for make in (lambda: nn.CrossEntropyLoss(weights), lambda: nn.MSELoss("avg")):  # class weights by position
        with pytest.raises(ValueError, match="reduction must be one of"):
            make()
    with pytest.raises(ValueError, match="negative_slope True is not a number"):
        init.calculate_gain("leaky_relu", True)


# --- attention ---------------------------------------------------------------------------------------


def _causal_mask(t):
    return torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # True = may not attend


class TorchCausalSelfAttention(torch.nn.Module):
    """torch's MultiheadAttention with a causal mask is the same computation: in_proj_weight packs q, k, v
    row-blocks exactly like distbp's qkv Linear, and heads split each block into (n_heads, d_head)."""

    def __init__(self, d, h):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(d, h, dropout=0.0, batch_first=True)

    def forward(self, x):
        t = x.shape[1]
        return self.mha(x, x, x, attn_mask=_causal_mask(t), need_weights=False)[0]


ATTN_MAP = {
    "mha.in_proj_weight": "qkv.weight", "mha.in_proj_bias": "qkv.bias",
    "mha.out_proj.weight": "proj.weight", "mha.out_proj.bias": "proj.bias",
}

# Attention chains three matmuls, a softmax and a projection; torch fuses the scaled dot product
# differently (scales q before the matmul), so float32 rounding accumulates more than in one op.
# Measured worst error here is < 2.5e-6, so the default 1e-5 holds; loosen only this one if needed.
ATTN_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,h,t", [(8, 2, 5), (12, 3, 7), (16, 1, 4)])
def test_causal_self_attention_matches_torch(rng, d, h, t):
    distbp.manual_seed(1)
    compare_with_torch(nn.CausalSelfAttention(d, h), TorchCausalSelfAttention(d, h), randn(rng, 3, t, d),
                       name_map=ATTN_MAP, **ATTN_TOL)


class TorchBlock(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(
            d, h, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True,
            activation=lambda v: torch.nn.functional.gelu(v, approximate="tanh"),  # distbp's block: GPT-2's GELU
        )

    def forward(self, x):
        t = x.shape[1]
        return self.layer(x, src_mask=_causal_mask(t), is_causal=True)


BLOCK_MAP = {
    "layer.norm1.weight": "ln1.weight", "layer.norm1.bias": "ln1.bias",
    "layer.self_attn.in_proj_weight": "attn.qkv.weight", "layer.self_attn.in_proj_bias": "attn.qkv.bias",
    "layer.self_attn.out_proj.weight": "attn.proj.weight", "layer.self_attn.out_proj.bias": "attn.proj.bias",
    "layer.norm2.weight": "ln2.weight", "layer.norm2.bias": "ln2.bias",
    "layer.linear1.weight": "mlp.fc.weight", "layer.linear1.bias": "mlp.fc.bias",
    "layer.linear2.weight": "mlp.proj.weight", "layer.linear2.bias": "mlp.proj.bias",
}


def test_transformer_block_matches_torch(rng):
    distbp.manual_seed(2)
    d = nn.TransformerBlock(16, 4)
    d.ln1.weight.data[...] = 1 + 0.3 * randn(rng, 16)
    d.ln2.bias.data[...] = 0.3 * randn(rng, 16)
    # pre-norm block: attention, layer norms and a GELU MLP in a row; tolerances as for attention
    compare_with_torch(d, TorchBlock(16, 4), randn(rng, 2, 6, 16), name_map=BLOCK_MAP, **ATTN_TOL)


@pytest.mark.parametrize("make", [lambda: nn.CausalSelfAttention(8, 2), lambda: nn.TransformerBlock(8, 2)],
                         ids=["attention", "block"])
def test_causality_later_steps_do_not_change_earlier_outputs(rng, make):
    distbp.manual_seed(3)
    m = make()
    x = randn(rng, 2, 9, 8)
    y = m(Tensor(x)).data
    for t0 in (0, 4, 8):
        x2 = x.copy()
        x2[:, t0:] += 10 * randn(rng, 2, 9 - t0, 8)
        y2 = m(Tensor(x2)).data
        np.testing.assert_array_equal(y2[:, :t0], y[:, :t0])
        assert np.all(np.abs(y2[:, t0] - y[:, t0]).max(axis=-1) > 1e-3)  # the changed step itself does move


def test_causality_of_gradients(rng):
    distbp.manual_seed(4)
    m = nn.CausalSelfAttention(8, 2)
    x = Tensor(randn(rng, 2, 6, 8), requires_grad=True)
    t = 3
    m(x)[:, t].sum().backward()
    assert not np.any(x.grad.data[:, t + 1:])
    assert np.all(np.abs(x.grad.data[:, : t + 1]).sum(axis=-1) > 0)


def test_attention_and_charlm_take_an_empty_sequence():
    x = Tensor(np.zeros((2, 0, 8), np.float32), requires_grad=True)
    for m in (nn.CausalSelfAttention(8, 2), nn.TransformerBlock(8, 2)):
        y = m(x)
        assert y.shape == (2, 0, 8)
        y.sum().backward()
        assert x.grad.shape == (2, 0, 8)
    lm = CharLM(5, 4, d_model=8, n_layers=1, n_heads=2)
    logits = lm(np.zeros((1, 0), np.int64))
    assert logits.shape == (1, 0, 5) and logits.dtype == np.float32


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        nn.CausalSelfAttention(10, 3)
    m = nn.CausalSelfAttention(8, 2)
    with pytest.raises(ValueError, match="8"):
        m(Tensor(np.zeros((2, 3, 6), np.float32)))


# --- CharLM.generate ----------------------------------------------------------------------------------


def _charlm(seed=0):
    distbp.manual_seed(seed)
    return CharLM(7, 4, d_model=8, n_layers=1, n_heads=2)


@pytest.mark.parametrize("prompt", [[], [1, 2], [1, 2, 3, 4, 5, 6]], ids=["empty", "short", "longer-than-block"])
@pytest.mark.parametrize("length", [0, 1, 5])
def test_charlm_generate_returns_exactly_length_codes(prompt, length):
    out = _charlm().generate(prompt, length, rng=np.random.default_rng(0))
    assert len(out) == length and all(0 <= c < 7 for c in out)


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_charlm_generate_refuses_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        _charlm().generate([1], 3, temperature=temperature)


def test_charlm_generate_temperature_zero_is_greedy():
    m = _charlm()
    greedy = m.generate([1, 2], 4, temperature=0)
    assert greedy == m.generate([1, 2], 4, temperature=0, rng=np.random.default_rng(5))
    codes = [1, 2]
    with distbp.no_grad():
        for _ in range(4):
            codes.append(int(np.argmax(m(np.asarray(codes[-4:])[None]).data[0, -1])))
    assert greedy == codes[2:]


def test_charlm_generate_at_temperature_zero_takes_the_first_of_near_tied_codes_every_time():
    # it divided by 1e-6 and still sampled: logits 2e-6 apart were picked 21 and 179 times in 200
    m = _charlm()
    m.head.weight.data[...] = 0
    m.head.bias.data[...] = np.array([5.0, 5.0 + 2e-6, 0, 0, 0, 0, 0], np.float32)
    picks = {m.generate([1], 1, temperature=0, rng=np.random.default_rng(i))[0] for i in range(50)}
    assert picks == {1}
    m.head.bias.data[...] = np.array([5.0, 5.0, 0, 0, 0, 0, 0], np.float32)  # an exact tie: the first
    assert {m.generate([1], 1, temperature=0, rng=np.random.default_rng(i))[0] for i in range(20)} == {0}


def test_charlm_generate_at_a_temperature_too_small_to_divide_by_is_greedy():
    m = _charlm()  # 1e-50 overflowed the float32 logits: NaN probabilities
    assert m.generate([1, 2], 5, temperature=1e-50) == m.generate([1, 2], 5, temperature=0)


@pytest.mark.parametrize("make, words", [
    (lambda: CharLM(7, 4, d_model=8, n_layers=1, n_heads=0), "n_heads must be an integer >= 1, got 0"),
    (lambda: CharLM(7, 4, d_model=8, n_layers=1, n_heads=-4), "n_heads must be an integer >= 1, got -4"),
    (lambda: CharLM(7, 0, d_model=8, n_layers=1, n_heads=2), "block_size must be an integer >= 1, got 0"),
    (lambda: CharLM(7, 4, d_model=8, n_layers=1, n_heads=True), "n_heads must be an integer >= 1, got True"),
    (lambda: _charlm().generate(np.array([[1, 2]]), 1), "the prompt must be a 1-d sequence of integer codes"),
    (lambda: _charlm().generate("ab", 1), "the prompt must be a 1-d sequence of integer codes"),
], ids=["zero-heads", "negative-heads", "zero-block", "bool-heads", "2-d-prompt", "string-prompt"])
def test_charlm_sizes_and_prompts_it_cannot_use_are_refused_by_name(make, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


@pytest.mark.parametrize("training", [True, False])
def test_charlm_generate_restores_the_training_mode_even_when_it_raises(training):
    m = _charlm().train(training)
    m.generate([1], 2)
    assert m.training is training
    with pytest.raises(IndexError, match="99"):
        m.generate([99], 1)  # a code outside the vocabulary
    assert all(mod.training is training for mod in m.modules())


def test_charlm_generate_default_rng_follows_manual_seed():
    m = _charlm()
    distbp.manual_seed(1)
    a = m.generate([1], 8)
    distbp.manual_seed(1)
    assert m.generate([1], 8) == a


# --- dropout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_train_zeroes_p_and_scales_rest(rng, p):
    distbp.manual_seed(0)
    d = nn.Dropout(p)
    x = rng.uniform(0.5, 1.5, size=(200, 500)).astype(np.float32)  # no zeros in the input
    xt = Tensor(x, requires_grad=True)
    y = d(xt)
    assert y.dtype == np.float32
    dropped = y.data == 0
    # binomial std of the fraction is sqrt(p(1-p)/n) < 0.0011; 5 sigma
    assert abs(dropped.mean() - p) < 0.006
    np.testing.assert_allclose(y.data[~dropped], x[~dropped] / (1 - p), rtol=1e-6)
    y.sum().backward()
    expected_grad = np.where(dropped, 0, 1 / (1 - p)).astype(np.float32)
    np.testing.assert_allclose(xt.grad.data, expected_grad, rtol=1e-6)


def test_dropout_deterministic_under_manual_seed(rng):
    x = Tensor(randn(rng, 50, 50))
    d = nn.Dropout(0.3)
    distbp.manual_seed(42)
    a = d(x).data
    b = d(x).data
    distbp.manual_seed(42)
    a2 = d(x).data
    b2 = d(x).data
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert not np.array_equal(a, b)  # consecutive draws differ
    distbp.manual_seed(43)
    assert not np.array_equal(d(x).data, a)


def test_dropout_identity_in_eval_and_for_p0(rng):
    x = Tensor(randn(rng, 10, 10), requires_grad=True)
    d = nn.Dropout(0.5).eval()
    y = d(x)
    np.testing.assert_array_equal(y.data, x.data)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.ones((10, 10), np.float32))
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).data, x.data)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p"):
        nn.Dropout(p)


# --- init --------------------------------------------------------------------------------------------


def _param(*shape, dtype=np.float32):
    return nn.Parameter(np.zeros(shape, dtype), dtype=dtype)


INIT_FNS = [
    ("uniform_", lambda p: init.uniform_(p, -2, 3)),
    ("normal_", lambda p: init.normal_(p, 1.0, 0.5)),
    ("constant_", lambda p: init.constant_(p, 0.25)),
    ("zeros_", init.zeros_),
    ("ones_", init.ones_),
    ("xavier_uniform_", init.xavier_uniform_),
    ("xavier_normal_", init.xavier_normal_),
    ("kaiming_uniform_", init.kaiming_uniform_),
    ("kaiming_normal_", init.kaiming_normal_),
    ("default_layer_init_", init.default_layer_init_),
]


@pytest.mark.parametrize("name,fn", INIT_FNS, ids=[n for n, _ in INIT_FNS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_in_place_keeps_shape_and_dtype(name, fn, dtype):
    p = _param(6, 5, 3, dtype=dtype)
    arr = p.data
    out = fn(p)
    assert out is p or out is None
    assert p.data is arr  # filled in place
    assert p.data.shape == (6, 5, 3)
    assert p.data.dtype == dtype
    assert p.requires_grad and p.grad is None


@pytest.mark.parametrize("shape", [(256, 512), (64, 32, 5, 5)], ids=["linear", "conv"])
def test_kaiming_and_xavier_statistics(shape):
    distbp.manual_seed(0)
    fan_in = shape[1] * math.prod(shape[2:])
    fan_out = shape[0] * math.prod(shape[2:])

    p = _param(*shape)
    init.kaiming_uniform_(p, nonlinearity="relu")
    bound = math.sqrt(2) * math.sqrt(3 / fan_in)
    assert np.abs(p.data).max() <= bound * (1 + 1e-6)
    assert np.abs(p.data).max() > 0.99 * bound
    np.testing.assert_allclose(p.data.std(), math.sqrt(2 / fan_in), rtol=0.02)

    init.kaiming_uniform_(p, a=math.sqrt(5))  # default leaky_relu: gain sqrt(2 / (1 + a^2))
    np.testing.assert_allclose(np.abs(p.data).max(), 1 / math.sqrt(fan_in), rtol=0.01)

    init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
    np.testing.assert_allclose(p.data.std(), math.sqrt(2 / fan_out), rtol=0.02)
    assert abs(p.data.mean()) < 0.05 * math.sqrt(2 / fan_out)

    init.kaiming_normal_(p, nonlinearity="tanh")
    np.testing.assert_allclose(p.data.std(), (5 / 3) / math.sqrt(fan_in), rtol=0.02)

    init.xavier_uniform_(p, gain=2.0)
    bound = 2.0 * math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(p.data).max() <= bound * (1 + 1e-6)
    assert np.abs(p.data).max() > 0.99 * bound
    np.testing.assert_allclose(p.data.std(), bound / math.sqrt(3), rtol=0.02)

    init.xavier_normal_(p)
    np.testing.assert_allclose(p.data.std(), math.sqrt(2 / (fan_in + fan_out)), rtol=0.02)
    assert p.data.dtype == np.float32


def test_calculate_gain_matches_torch():
    for nl, param in [("linear", None), ("sigmoid", None), ("tanh", None), ("relu", None), ("conv2d", None),
                      ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", math.sqrt(5))]:
        assert init.calculate_gain(nl, param) == pytest.approx(torch.nn.init.calculate_gain(nl, param), rel=1e-12)
    with pytest.raises(ValueError, match="bogus"):
        init.calculate_gain("bogus")


def test_init_errors():
    with pytest.raises(ValueError, match="2 or more"):
        init.xavier_uniform_(_param(5))
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal_(_param(3, 3), mode="fan_avg")


RANDOM_INIT_FNS = [f for f in INIT_FNS if f[0] not in ("constant_", "zeros_", "ones_")]


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (0, 0), (2, 0, 3, 3), (2, 3, 0, 3)])
@pytest.mark.parametrize("name,fn", INIT_FNS, ids=[n for n, _ in INIT_FNS])
def test_init_of_a_zero_element_tensor_is_a_no_op(name, fn, shape):
    p = _param(*shape)
    warns = name.startswith(("xavier", "kaiming", "default"))  # a fan of 0 would divide by zero; PyTorch warns
    with pytest.warns(UserWarning, match="zero-element") if warns else contextlib.nullcontext():
        assert fn(p) is p or name == "default_layer_init_"
    assert p.shape == shape


@pytest.mark.parametrize("name,fn", RANDOM_INIT_FNS, ids=[n for n, _ in RANDOM_INIT_FNS])
def test_init_deterministic_under_manual_seed(name, fn):
    a, b = _param(20, 10), _param(20, 10)
    distbp.manual_seed(7)
    fn(a)
    distbp.manual_seed(7)
    fn(b)
    np.testing.assert_array_equal(a.data, b.data)
    fn(b)  # the stream moves on
    assert not np.array_equal(a.data, b.data)


def test_init_with_explicit_rng_and_layer_construction_reproducible():
    a, b = _param(8, 8), _param(8, 8)
    init.normal_(a, rng=np.random.default_rng(5))
    init.normal_(b, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.data, b.data)

    def build():
        distbp.manual_seed(11)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), nn.Embedding(5, 4),
                             nn.TransformerBlock(8, 2))

    s1, s2 = build(), build()
    for (n1, p1), (n2, p2) in zip(s1.named_parameters(), s2.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)
        assert p1.data.dtype == np.float32


# --- clip_grad_norm_ ---------------------------------------------------------------------------------


def _grads_pair(rng, scale):
    shapes = [(4, 3), (3,), (2, 2, 2)]
    dps, tps = [], []
    for s in shapes:
        g = randn(rng, *s) * scale
        dp = nn.Parameter(np.zeros(s, np.float32))
        dp.grad = Tensor(g.copy())
        tp = torch.nn.Parameter(torch.zeros(s))
        tp.grad = torch.from_numpy(g.copy())
        dps.append(dp)
        tps.append(tp)
    return dps, tps


@pytest.mark.parametrize("max_norm,scale", [(1.0, 1.0), (0.1, 5.0), (100.0, 1.0), (5.0, 0.01)])
def test_clip_grad_norm_matches_torch(rng, max_norm, scale):
    dps, tps = _grads_pair(rng, scale)
    before = [p.grad.data.copy() for p in dps]
    total_d = nn.clip_grad_norm_(dps, max_norm)
    total_t = torch.nn.utils.clip_grad_norm_(tps, max_norm)
    assert float(total_d) == pytest.approx(float(total_t), rel=1e-6)
    for dp, tp in zip(dps, tps):
        assert dp.grad.data.dtype == np.float32
        np.testing.assert_allclose(dp.grad.data, t2n(tp.grad), rtol=1e-6, atol=1e-8)
    new_norm = math.sqrt(sum(float((p.grad.data.astype(np.float64) ** 2).sum()) for p in dps))
    if total_d > max_norm:
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
    else:
        for dp, b in zip(dps, before):
            np.testing.assert_array_equal(dp.grad.data, b)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1, 3.5])
@pytest.mark.parametrize("max_norm,scale", [(1.0, 1.0), (0.1, 5.0), (100.0, 1.0)])
def test_clip_grad_norm_takes_torchs_norm_type_in_third_place(rng, norm_type, max_norm, scale):
    # code written for torch passes norm_type by position: it must not land on another parameter
    dps, tps = _grads_pair(rng, scale)
    total_d = nn.clip_grad_norm_(dps, max_norm, norm_type)
    total_t = torch.nn.utils.clip_grad_norm_(tps, max_norm, norm_type)
    assert float(total_d) == pytest.approx(float(total_t), rel=1e-5)
    for dp, tp in zip(dps, tps):
        assert dp.grad.data.dtype == np.float32
        np.testing.assert_allclose(dp.grad.data, t2n(tp.grad), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), "2", True])
def test_clip_grad_norm_refuses_a_norm_type_that_is_not_a_positive_number(rng, bad):
    dps, _ = _grads_pair(rng, 1.0)
    with pytest.raises(ValueError, match="norm_type must be a number > 0"):
        nn.clip_grad_norm_(dps, 1.0, bad)


def test_clip_grad_norm_reports_nan_in_any_gradient_and_a_tiny_p_as_inf(rng):
    dps, _ = _grads_pair(rng, 1.0)
    dps[2].grad.data.flat[3] = np.nan  # not the first gradient: max() over the tensors skipped it
    before = [p.grad.data.copy() for p in dps]
    for norm_type in (math.inf, 2.0, 3.0):
        assert math.isnan(nn.clip_grad_norm_(dps, 1.0, norm_type))
    for p, b in zip(dps, before):
        np.testing.assert_array_equal(p.grad.data, b)
    dps, _ = _grads_pair(rng, 1.0)
    assert nn.clip_grad_norm_(dps, 1.0, 1e-6) == math.inf  # (eps given by position, as once: a huge norm)


def test_clip_grad_norm_of_float16_gradients_past_256_is_finite_and_clips():
    p = nn.Parameter(np.zeros(4, np.float16), dtype=np.float16)
    p.grad = Tensor(np.full(4, 300, np.float16), dtype=np.float16)
    assert nn.clip_grad_norm_([p], 1.0) == pytest.approx(600.0)
    np.testing.assert_allclose(p.grad.data, 0.5, rtol=1e-3)


def test_clip_grad_norm_clips_finite_gradients_whose_squares_overflow():
    # float32 squares overflow from |g| ~ 1.8e19: the norm came out inf and the gradients were left alone
    p, q = nn.Parameter(np.zeros(4, np.float32)), nn.Parameter(np.zeros(2, np.float32))
    p.grad = Tensor(np.full(4, 1e20, np.float32))
    q.grad = Tensor(np.array([3.0, -1e19], np.float32))
    want = math.sqrt(4 * 1e40 + 1e38)
    assert nn.clip_grad_norm_([p, q], 1.0) == pytest.approx(want, rel=1e-6)
    assert p.grad.dtype == q.grad.dtype == np.float32
    np.testing.assert_allclose(p.grad.data, 1e20 / want, rtol=1e-6)
    np.testing.assert_allclose(q.grad.data, np.array([3.0, -1e19]) / want, rtol=1e-6)
    # a norm past float64's range is inf, and the gradients are still clipped to max_norm
    r = nn.Parameter(np.zeros(3), dtype=np.float64)
    r.grad = Tensor(np.array([1.5e308, -1.5e308, 1.0]), dtype=np.float64)
    assert nn.clip_grad_norm_([r], 2.0) == math.inf
    np.testing.assert_allclose(r.grad.data, [math.sqrt(2), -math.sqrt(2), 0.0], rtol=1e-12, atol=1e-300)


def test_clip_grad_norm_skips_params_without_grad_and_accepts_generators(rng):
    dps, _ = _grads_pair(rng, 10.0)
    extra = nn.Parameter(np.ones(3, np.float32))
    total = nn.clip_grad_norm_((p for p in dps + [extra]), 1.0)
    expected = math.sqrt(sum(float((p.grad.data.astype(np.float64) ** 2).sum()) for p in dps))
    assert total > 1.0 and extra.grad is None
    assert expected == pytest.approx(1.0, rel=1e-5)
    assert nn.clip_grad_norm_([extra], 1.0) == 0.0


def test_clip_grad_norm_non_finite_leaves_grads_alone(rng):
    dps, _ = _grads_pair(rng, 1.0)
    dps[1].grad.data[0] = np.inf
    before = [p.grad.data.copy() for p in dps]
    total = nn.clip_grad_norm_(dps, 1.0)
    assert not math.isfinite(total)
    for p, b in zip(dps, before):
        np.testing.assert_array_equal(p.grad.data, b)


def test_clip_grad_norm_single_tensor(rng):
    dps, tps = _grads_pair(rng, 10.0)
    total_t = torch.nn.utils.clip_grad_norm_(tps[0], 1.0)
    total_d = nn.clip_grad_norm_(dps[0], 1.0)
    assert float(total_d) == pytest.approx(float(total_t), rel=1e-6)
    np.testing.assert_allclose(dps[0].grad.data, t2n(tps[0].grad), rtol=1e-6)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_a_tied_parameter_is_in_the_state_under_each_of_its_names_as_in_pytorch():
    torch = pytest.importorskip("torch")

    class TorchTied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    m, t = _Tied(), TorchTied()
    assert list(m.state_dict()) == list(t.state_dict()) == ["emb.weight", "out.weight"]
    assert [n for n, _ in m.named_parameters()] == ["emb.weight"]  # the optimizer still sees it once
    assert m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()}) == ([], [])
    np.testing.assert_array_equal(m.out.weight.data, t.emb.weight.detach().numpy())
    t.load_state_dict({k: torch.from_numpy(v) for k, v in _Tied().state_dict().items()})  # and back


def test_a_tied_parameter_named_once_loads_and_two_values_for_it_are_refused():
    m, other = _Tied(), _Tied()
    assert m.load_state_dict({"emb.weight": other.emb.weight.data}) == ([], [])  # an older distbp state
    np.testing.assert_array_equal(m.out.weight.data, other.emb.weight.data)
    before = m.emb.weight.data.copy()
    with pytest.raises(ValueError, match="emb.weight and out.weight are one .tied. parameter, and the state gives"):
        m.load_state_dict({"emb.weight": np.zeros((5, 3), np.float32), "out.weight": np.ones((5, 3), np.float32)})
    np.testing.assert_array_equal(m.emb.weight.data, before)


def test_a_tied_parameter_holding_nan_loads_its_own_state():
    m = _Tied()
    m.emb.weight.data[0, 0] = np.nan
    assert m.load_state_dict(m.state_dict()) == ([], [])
