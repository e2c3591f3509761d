"""distbp.optim: SGD/Adam/AdamW and the LR schedules against torch.optim, exact resume, and error reporting."""

import copy
import math
import pickle

import numpy as np
import pytest

import distbp
from distbp import Tensor, nn, optim

torch = pytest.importorskip("torch", reason="PyTorch is the test oracle; install with pip install -e '.[test]'")

SHAPES = [(5, 4), (5,), (3, 2, 2)]
STEPS = 20


# --- helpers ---------------------------------------------------------------------------------------


def t2n(t):
    return t.detach().cpu().numpy()


def make_params(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    dps = [nn.Parameter(a.copy()) for a in init]
    tps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    return dps, tps


def fixed_grads(seed, steps=STEPS, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]


def run_fixed(dopt, topt, dps, tps, grads):
    """Feed the same gradient arrays to both optimizers for every step."""
    for step_grads in grads:
        for dp, tp, g in zip(dps, tps, step_grads):
            dp.grad = Tensor(g.copy())
            tp.grad = torch.from_numpy(g.copy())
        dopt.step()
        topt.step()


def assert_params_match(dps, tps, rtol=1e-5, atol=1e-6):
    for i, (dp, tp) in enumerate(zip(dps, tps)):
        assert dp.data.dtype == np.float32, f"param {i} became {dp.data.dtype}"
        np.testing.assert_allclose(dp.data, t2n(tp), rtol=rtol, atol=atol, err_msg=f"param {i}")


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.5),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.05, momentum=0.8, weight_decay=0.05),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1),
]

ADAM_CONFIGS = [
    dict(),
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
]

ADAMW_CONFIGS = [
    dict(lr=0.01),  # torch and distbp both default to weight_decay=0.01
    dict(lr=0.01, weight_decay=0.0),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.05, betas=(0.85, 0.95), eps=1e-6, weight_decay=0.3),
]

ALL_CONFIGS = (
    [("SGD", c) for c in SGD_CONFIGS] + [("Adam", c) for c in ADAM_CONFIGS] + [("AdamW", c) for c in ADAMW_CONFIGS]
)
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in c.items()) or 'default'}" for name, c in ALL_CONFIGS]


def make_opts(name, cfg, dps, tps):
    dopt = getattr(optim, name)(dps, **cfg)
    topt = getattr(torch.optim, name)(tps, **cfg, foreach=False)
    return dopt, topt


# --- against torch: fixed gradients ------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg", ALL_CONFIGS, ids=IDS)
def test_matches_torch_on_fixed_gradients(name, cfg):
    dps, tps = make_params(0)
    dopt, topt = make_opts(name, cfg, dps, tps)
    run_fixed(dopt, topt, dps, tps, fixed_grads(1))
    assert_params_match(dps, tps)
    # the parameters really moved
    assert not np.allclose(dps[0].data, make_params(0)[0][0].data)


@pytest.mark.parametrize("name,cfg", ALL_CONFIGS, ids=IDS)
def test_state_names_and_values_match_torch(name, cfg):
    dps, tps = make_params(0)
    dopt, topt = make_opts(name, cfg, dps, tps)
    run_fixed(dopt, topt, dps, tps, fixed_grads(2, steps=5))
    for dp, tp in zip(dps, tps):
        ds, ts = dopt.state[dp], topt.state[tp]
        assert set(ds) == {k for k, v in ts.items() if v is not None}
        for k, v in ds.items():
            if isinstance(v, np.ndarray):
                assert v.dtype == np.float32, f"state {k} is {v.dtype}"
                np.testing.assert_allclose(v, t2n(ts[k]), rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert v == float(ts[k])


def test_param_without_grad_is_skipped_like_torch():
    dps, tps = make_params(0)
    dopt, topt = make_opts("Adam", dict(lr=0.01), dps, tps)
    grads = fixed_grads(3, steps=6)
    for i, step_grads in enumerate(grads):
        for j, (dp, tp, g) in enumerate(zip(dps, tps, step_grads)):
            has = not (j == 1 and i % 2)  # param 1 has a gradient only on even steps
            dp.grad = Tensor(g.copy()) if has else None
            tp.grad = torch.from_numpy(g.copy()) if has else None
        dopt.step()
        topt.step()
    assert_params_match(dps, tps)
    assert dopt.state[dps[1]]["step"] == 3


# --- against torch: a small model trained end to end -------------------------------------------------


def _models(seed):
    distbp.manual_seed(seed)
    d = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    t = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for (_, dp), (_, tp) in zip(d.named_parameters(), t.named_parameters()):
            tp.copy_(torch.from_numpy(dp.data.copy()))
    return d, t


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((32, 6)).astype(np.float32), rng.standard_normal((32, 3)).astype(np.float32)


# Forward/backward of distbp and torch differ by float32 rounding every step and 20 steps feed that
# back through the model; measured drift is < 2e-7 absolute, so rtol 1e-5 holds. The atol 1e-6 floor is
# for entries near zero, where a 1e-7 absolute difference is a large relative one.
E2E_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,cfg",
    [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
     ("Adam", dict(lr=0.01, weight_decay=1e-3)),
     ("AdamW", dict(lr=0.01, weight_decay=0.05))],
    ids=["SGD", "Adam", "AdamW"],
)
def test_small_model_training_matches_torch(name, cfg):
    d, t = _models(0)
    x, y = _data()
    dopt = getattr(optim, name)(d.parameters(), **cfg)
    topt = getattr(torch.optim, name)(t.parameters(), **cfg, foreach=False)
    losses_d, losses_t = [], []
    for _ in range(STEPS):
        dopt.zero_grad()
        loss = nn.MSELoss()(d(Tensor(x)), Tensor(y))
        loss.backward()
        dopt.step()
        losses_d.append(loss.item())
        topt.zero_grad()
        tloss = torch.nn.functional.mse_loss(t(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        losses_t.append(tloss.item())
    np.testing.assert_allclose(losses_d, losses_t, rtol=1e-5)
    assert losses_d[-1] < losses_d[0]
    for (n, dp), (_, tp) in zip(d.named_parameters(), t.named_parameters()):
        assert dp.data.dtype == np.float32
        np.testing.assert_allclose(dp.data, t2n(tp), err_msg=n, **E2E_TOL)


# --- parameter groups --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shared,groups", [
    ("SGD", dict(lr=0.1, momentum=0.9), [dict(), dict(lr=0.01), dict(lr=0.5, momentum=0.5, weight_decay=0.1)]),
    ("Adam", dict(lr=0.01), [dict(), dict(lr=0.001), dict(lr=0.05, betas=(0.5, 0.9))]),
    ("AdamW", dict(lr=0.01, weight_decay=0.1), [dict(weight_decay=0.0), dict(lr=0.001), dict(lr=0.05)]),
])
def test_param_groups_match_torch(name, shared, groups):
    dps, tps = make_params(0)
    dopt = getattr(optim, name)([{"params": [p], **g} for p, g in zip(dps, groups)], **shared)
    topt = getattr(torch.optim, name)([{"params": [p], **g} for p, g in zip(tps, groups)], **shared, foreach=False)
    assert [g["lr"] for g in dopt.param_groups] == [g["lr"] for g in topt.param_groups]
    run_fixed(dopt, topt, dps, tps, fixed_grads(4))
    assert_params_match(dps, tps)


def test_group_lr_really_differs():
    dps, _ = make_params(0)
    before = [p.data.copy() for p in dps]
    opt = optim.SGD([{"params": dps[:1]}, {"params": dps[1:2], "lr": 0.0}, {"params": dps[2:], "lr": 1.0}], lr=0.1)
    for p in dps:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    opt.step()
    np.testing.assert_allclose(dps[0].data, before[0] - 0.1, rtol=1e-6)
    np.testing.assert_array_equal(dps[1].data, before[1])
    np.testing.assert_allclose(dps[2].data, before[2] - 1.0, rtol=1e-6)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.0


def test_add_param_group():
    dps, tps = make_params(0)
    dopt = optim.Adam(dps[:2], lr=0.01)
    dopt.add_param_group({"params": dps[2], "lr": 0.1})
    topt = torch.optim.Adam(tps[:2], lr=0.01, foreach=False)
    topt.add_param_group({"params": tps[2], "lr": 0.1})
    assert len(dopt.param_groups) == 2 and dopt.param_groups[1]["betas"] == (0.9, 0.999)
    run_fixed(dopt, topt, dps, tps, fixed_grads(5))
    assert_params_match(dps, tps)
    with pytest.raises(ValueError, match="more than one group"):
        dopt.add_param_group({"params": [dps[0]]})


# --- state_dict --------------------------------------------------------------------------------------


def _train(model, opt, x, y, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        nn.MSELoss()(model(Tensor(x)), Tensor(y)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _build(name, cfg, seed=0, groups=False):
    distbp.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
    if groups:
        ps = list(model.parameters())
        params = [{"params": ps[:2]}, {"params": ps[2:], "lr": cfg["lr"] / 3}]
    else:
        params = model.parameters()
    return model, getattr(optim, name)(params, **cfg)


RESUME_CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=1e-3)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("name,cfg", RESUME_CONFIGS, ids=[f"{n}{i}" for i, (n, _) in enumerate(RESUME_CONFIGS)])
def test_resume_is_bit_exact(name, cfg, groups):
    x, y = _data(1)
    ref_model, ref_opt = _build(name, cfg, groups=groups)
    _train(ref_model, ref_opt, x, y, 20)

    model, opt = _build(name, cfg, groups=groups)
    _train(model, opt, x, y, 10)
    # through pickle, as a checkpoint file would
    ckpt = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    _train(model, opt, x, y, 3)  # the live objects move on; the checkpoint must not

    model2, opt2 = _build(name, cfg, seed=99, groups=groups)  # different init: everything comes from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, x, y, 10)

    for (n, a), (_, b) in zip(ref_model.named_parameters(), model2.named_parameters()):
        assert np.array_equal(a.data, b.data), f"{n} differs after resume"
        assert b.data.dtype == np.float32
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    for p_ref, p_new in zip(ref_model.parameters(), model2.parameters()):
        s_ref, s_new = ref_opt.state[p_ref], opt2.state[p_new]
        assert set(s_ref) == set(s_new)
        for k in s_ref:
            assert np.array_equal(s_ref[k], s_new[k]), k
            if isinstance(s_new[k], np.ndarray):
                assert s_new[k].dtype == np.float32


def test_state_dict_is_a_snapshot_and_torch_shaped():
    model, opt = _build("Adam", dict(lr=0.01), groups=True)
    x, y = _data(1)
    _train(model, opt, x, y, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    assert sd["param_groups"][1]["lr"] == pytest.approx(0.01 / 3)
    assert set(sd["state"]) == set(range(6))
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and sd["state"][0]["step"] == 2
    saved = copy.deepcopy(sd)
    _train(model, opt, x, y, 1)
    opt.param_groups[0]["lr"] = 123.0
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert np.array_equal(v, saved["state"][i][k])
    assert sd["param_groups"][0]["lr"] == 0.01


def _adam_pair(shapes_a, shapes_b, groups_b=None):
    rng = np.random.default_rng(0)
    pa = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes_a]
    pb = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes_b]
    a = optim.Adam(pa, lr=0.01)
    for p in pa:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    a.step()
    b = optim.Adam(groups_b(pb) if groups_b else pb, lr=0.5)
    for p in pb:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    b.step()
    return a, b, pb


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_opt_unchanged(opt, snap):
    now = opt.state_dict()
    assert [{k: v for k, v in g.items()} for g in now["param_groups"]] == snap["param_groups"]
    assert set(now["state"]) == set(snap["state"])
    for i in now["state"]:
        for k, v in now["state"][i].items():
            assert np.array_equal(v, snap["state"][i][k])


def test_load_state_dict_wrong_group_count():
    a, b, _ = _adam_pair([(2,), (3,)], [(2,), (3,)], groups_b=lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}])
    snap = _snapshot(b)
    with pytest.raises(ValueError, match=r"1 parameter groups.*2"):
        b.load_state_dict(a.state_dict())
    _assert_opt_unchanged(b, snap)


def test_load_state_dict_wrong_param_count():
    a, b, _ = _adam_pair([(2,), (3,)], [(2,), (3,), (4,)])
    snap = _snapshot(b)
    with pytest.raises(ValueError, match=r"group 0 has 2 parameters.*3"):
        b.load_state_dict(a.state_dict())
    _assert_opt_unchanged(b, snap)


def test_load_state_dict_wrong_shape():
    a, b, _ = _adam_pair([(2,), (3,)], [(2,), (4,)])
    snap = _snapshot(b)
    with pytest.raises(ValueError, match=r"exp_avg.*parameter 1.*\(3,\).*\(4,\)"):
        b.load_state_dict(a.state_dict())
    _assert_opt_unchanged(b, snap)  # parameter 0's state and the lr were not half-loaded


def test_load_state_dict_missing_sections_and_unknown_index():
    a, b, _ = _adam_pair([(2,), (3,)], [(2,), (3,)])
    snap = _snapshot(b)
    with pytest.raises(KeyError, match="param_groups"):
        b.load_state_dict({"state": {}})
    sd = a.state_dict()
    sd["state"][7] = sd["state"][0]
    with pytest.raises(KeyError, match="7"):
        b.load_state_dict(sd)
    _assert_opt_unchanged(b, snap)


def _drop(key):
    def change(sd):
        del sd["state"][1][key]
    return change


def _set_state(key, value):
    def change(sd):
        sd["state"][1][key] = value
    return change


def _set_group(key, value):
    def change(sd):
        sd["param_groups"][0][key] = value
    return change


BAD_ADAM_STATES = [
    pytest.param(_drop("exp_avg_sq"), r"parameter 1 lacks \['exp_avg_sq'\]", id="no-exp_avg_sq"),
    pytest.param(_drop("exp_avg"), r"parameter 1 lacks \['exp_avg'\]", id="no-exp_avg"),
    pytest.param(_drop("step"), r"parameter 1 lacks \['step'\]", id="no-step"),
    pytest.param(_set_state("step", -1), "'step' for parameter 1 is -1", id="negative-step"),
    pytest.param(_set_state("step", 2.5), "'step' for parameter 1 is 2.5", id="float-step"),
    pytest.param(_set_state("step", True), "'step' for parameter 1 is True", id="bool-step"),
    pytest.param(_set_state("step", "1"), "'step' for parameter 1 is '1'", id="string-step"),
    pytest.param(_set_state("exp_avg", np.zeros(3, np.int32)), "'exp_avg' for parameter 1 has dtype int32",
                 id="int-array"),
    pytest.param(_set_state("exp_avg", 0.0), "'exp_avg' for parameter 1 is a float, not an array", id="not-array"),
    pytest.param(_set_state("exp_avg_sq", np.zeros((3, 1), np.float32)), r"'exp_avg_sq' for parameter 1 has shape",
                 id="wrong-shape"),
    pytest.param(_set_state("momentum_buffer", np.zeros(3, np.float32)), "parameter 1 has entries "
                 r"\['momentum_buffer'\] that Adam does not keep", id="unknown-entry"),
    pytest.param(_set_group("lr", -1.0), "learning rate", id="negative-lr"),
    pytest.param(_set_group("betas", (0.9, "x")), "betas", id="bad-betas"),
    pytest.param(_set_group("momentum", 0.9), "unknown hyper-parameters", id="unknown-hyper-parameter"),
    pytest.param(lambda sd: sd["param_groups"][0].update(params=[1, 1]), "index 1 more than once",
                 id="index-twice"),
    pytest.param(lambda sd: sd["state"].update({"1": sd["state"][1]}), "index 1 more than once",
                 id="state-twice"),
]


@pytest.mark.parametrize("change, words", BAD_ADAM_STATES)
def test_load_state_dict_refuses_state_step_cannot_use(change, words):
    a, b, pb = _adam_pair([(2,), (3,)], [(2,), (3,)])
    for p in pb:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    sd = copy.deepcopy(a.state_dict())
    change(sd)
    snap = _snapshot(b)
    with pytest.raises((ValueError, TypeError, KeyError), match=words):
        b.load_state_dict(sd)
    _assert_opt_unchanged(b, snap)
    with pytest.raises((ValueError, TypeError, KeyError), match=words):
        b.check_state_dict(sd)
    _assert_opt_unchanged(b, snap)
    b.step()  # the refused state left a working optimizer


def test_load_state_dict_adam_without_any_state_for_a_parameter():
    # a parameter with no gradient yet has no state at all: that is not a missing entry
    a, b, pb = _adam_pair([(2,), (3,)], [(2,), (3,)])
    sd = a.state_dict()
    del sd["state"][1]
    b.load_state_dict(sd)
    assert pb[1] not in b.state and b.state[pb[0]]["step"] == 1
    for p in pb:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    b.step()
    assert b.state[pb[1]]["step"] == 1 and b.state[pb[0]]["step"] == 2


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_load_state_dict_sgd_momentum_buffer_stays_optional(momentum):
    ps = [nn.Parameter(np.ones(s, np.float32)) for s in [(2,), (3,)]]
    src = optim.SGD(ps, lr=0.1, momentum=momentum)
    ps[0].grad = Tensor(np.ones(2, np.float32))  # only parameter 0 steps
    src.step()
    sd = src.state_dict()
    assert ("momentum_buffer" in sd["state"][0]) == bool(momentum) and 1 not in sd["state"]
    sd["state"][1] = {}  # state made by a step without momentum
    qs = [nn.Parameter(np.ones(s, np.float32)) for s in [(2,), (3,)]]
    dst = optim.SGD(qs, lr=0.5, momentum=momentum)
    dst.load_state_dict(sd)
    assert dst.state[qs[1]] == {} and dst.param_groups[0]["lr"] == 0.1
    for q in qs:
        q.grad = Tensor(np.ones(q.shape, np.float32))
    dst.step()
    bad = copy.deepcopy(src.state_dict())
    bad["state"][0] = {"exp_avg": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"parameter 0 has entries \['exp_avg'\] that SGD does not keep"):
        dst.load_state_dict(bad)


def test_load_state_dict_counts_come_back_as_ints():
    a, b, pb = _adam_pair([(2,), (3,)], [(2,), (3,)])
    sd = a.state_dict()
    sd["state"][0]["step"] = np.int64(4)
    b.load_state_dict(sd)
    assert type(b.state[pb[0]]["step"]) is int and b.state[pb[0]]["step"] == 4


# --- hyper-parameter validation ----------------------------------------------------------------------


def _p():
    return nn.Parameter(np.zeros(3, np.float32))


@pytest.mark.parametrize("factory,match", [
    pytest.param(lambda: optim.SGD([_p()], lr=-0.1), "learning rate", id="sgd-negative-lr"),
    pytest.param(lambda: optim.SGD([_p()], lr="0.1"), "learning rate", id="sgd-str-lr"),
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, momentum=-0.5), "momentum", id="sgd-negative-momentum"),
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, weight_decay=-1e-4), "weight_decay", id="sgd-negative-wd"),
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, nesterov=True), "nesterov", id="sgd-nesterov-no-momentum"),
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov",
                 id="sgd-nesterov-dampening"),
    pytest.param(lambda: optim.Adam([_p()], lr=-1e-3), "learning rate", id="adam-negative-lr"),
    pytest.param(lambda: optim.Adam([_p()], betas=(1.0, 0.999)), "betas", id="adam-beta1-eq-1"),
    pytest.param(lambda: optim.Adam([_p()], betas=(0.9, -0.1)), "betas", id="adam-negative-beta2"),
    pytest.param(lambda: optim.AdamW([_p()], betas=(-0.1, 0.999)), "betas", id="adamw-negative-beta1"),
    pytest.param(lambda: optim.Adam([_p()], eps=-1e-8), "eps", id="adam-negative-eps"),
    pytest.param(lambda: optim.AdamW([_p()], weight_decay=-0.01), "weight_decay", id="adamw-negative-wd"),
    pytest.param(lambda: optim.SGD([{"params": [_p()], "lr": -1.0}], lr=0.1), "learning rate", id="group-negative-lr"),
    pytest.param(lambda: optim.SGD([], lr=0.1), "empty", id="empty-params"),
    # nan passes every comparison, and one step then makes every parameter nan
    pytest.param(lambda: optim.SGD([_p()], lr=float("nan")), "learning rate", id="sgd-nan-lr"),
    pytest.param(lambda: optim.SGD([_p()], lr=float("inf")), "learning rate", id="sgd-inf-lr"),
    pytest.param(lambda: optim.SGD([_p()], lr=10**400), "learning rate", id="sgd-huge-int-lr"),  # no float holds it
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, momentum=float("nan")), "momentum", id="sgd-nan-momentum"),
    pytest.param(lambda: optim.SGD([_p()], lr=0.1, dampening=float("nan")), "dampening", id="sgd-nan-dampening"),
    pytest.param(lambda: optim.Adam([_p()], lr=np.float32("nan")), "learning rate", id="adam-nan-lr"),
    pytest.param(lambda: optim.Adam([_p()], eps=float("nan")), "eps", id="adam-nan-eps"),
    pytest.param(lambda: optim.AdamW([_p()], weight_decay=float("nan")), "weight_decay", id="adamw-nan-wd"),
    pytest.param(lambda: optim.Adam([_p()], betas=(float("nan"), 0.999)), "betas", id="adam-nan-beta1"),
])
def test_invalid_hyper_parameters_raise_value_error(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD([{"params": [p], "nesterov_momentum": 0.9}], lr=0.1),
    lambda p: optim.Adam([{"params": [p], "beta1": 0.9}]),
    lambda p: optim.AdamW([{"params": [p], "momentum": 0.9}]),
], ids=["SGD", "Adam", "AdamW"])
def test_unknown_key_in_param_group(make):
    with pytest.raises(KeyError, match=r"unknown hyper-parameters \['(nesterov_momentum|beta1|momentum)'\]"):
        make(_p())


def test_non_parameters_rejected():
    with pytest.raises(TypeError, match="ndarray"):
        optim.SGD([np.zeros(3, np.float32)], lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(3,\) computed from others is not a parameter"):
        optim.SGD([_p() * 2], lr=0.1)
    p = _p()
    with pytest.raises(ValueError, match="more than one group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_frozen_parameter_is_taken_and_steps_once_unfrozen(name):
    # fine-tuning: the backbone is frozen, and the optimizer gets every parameter (PyTorch takes them too)
    frozen, live = nn.Parameter(np.ones(3, np.float32)), nn.Parameter(np.full(3, 2, np.float32))
    frozen.requires_grad_(False)
    before = frozen.data.copy()
    opt = getattr(optim, name)([frozen, live], lr=0.1, weight_decay=0.1)
    (live * live).sum().backward()
    opt.step()
    np.testing.assert_array_equal(frozen.data, before)
    frozen.requires_grad_(True)
    opt.zero_grad()
    (frozen * live).sum().backward()
    opt.step()
    assert not np.array_equal(frozen.data, before)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_parameter_listed_twice_in_one_group_rejected(name):
    p, q = _p(), _p()
    with pytest.raises(ValueError, match="position 2 of the group.*more than once"):
        getattr(optim, name)([p, q, p], lr=0.1)
    opt = getattr(optim, name)([q], lr=0.1)
    with pytest.raises(ValueError, match="position 1 of the group.*more than once"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1  # the refused group was not half-added


@pytest.mark.parametrize("name,cfg", [("SGD", {}), ("SGD", {"momentum": 0.9, "weight_decay": 0.1}),
                                      ("Adam", {}), ("AdamW", {"weight_decay": 0.1})])
def test_a_parameter_with_no_elements_steps(name, cfg):
    # BLAS refuses empty vectors; torch.optim steps them (a zero-width layer, an empty embedding table)
    empty, full = nn.Parameter(np.zeros((0, 3), np.float32)), _p()
    opt = getattr(optim, name)([empty, full], lr=0.1, **cfg)
    for _ in range(2):
        empty.grad = Tensor(np.zeros((0, 3), np.float32))
        full.grad = Tensor(np.ones(3, np.float32))
        opt.step()
    assert empty.data.shape == (0, 3) and (full.data < 0).all()


def test_bad_betas_in_param_group_rejected():
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([{"params": [_p()], "betas": (1.5, 0.999)}])


def test_nesterov_without_momentum_in_param_group_rejected():
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([{"params": [_p()], "momentum": 0.0}], lr=0.1, momentum=0.9, nesterov=True)


# --- dtypes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg", ALL_CONFIGS, ids=IDS)
def test_float32_stays_float32(name, cfg):
    dps, _ = make_params(0)
    opt = getattr(optim, name)(dps, **cfg)
    for step_grads in fixed_grads(6, steps=5):
        for p, g in zip(dps, step_grads):
            p.grad = Tensor(g)
        opt.step()
    for p in dps:
        assert p.data.dtype == np.float32
        for k, v in opt.state[p].items():
            if isinstance(v, np.ndarray):
                assert v.dtype == np.float32, f"state {k} is {v.dtype}"


@pytest.mark.parametrize("name,cfg", [
    pytest.param("SGD", dict(lr=np.float64(0.05), momentum=np.float64(0.9), weight_decay=np.float64(0.01)), id="SGD-momentum"),
    pytest.param("SGD", dict(lr=np.float64(0.05), momentum=0.9, nesterov=True, weight_decay=np.float64(0.01)), id="SGD-nesterov"),
    pytest.param("SGD", dict(lr=np.float64(0.05), momentum=np.float64(0.9), dampening=np.float64(0.1)),
                 id="SGD-no-wd"),
    pytest.param("Adam", dict(lr=np.float64(0.01), betas=(np.float64(0.9), np.float64(0.99)),
                              weight_decay=np.float64(0.01)), id="Adam"),
    pytest.param("AdamW", dict(lr=np.float64(0.01), weight_decay=np.float64(0.1)), id="AdamW"),
])
def test_float32_stays_float32_with_numpy_float64_hyper_parameters(name, cfg):
    """Hyper-parameters from numpy (np.linspace sweeps, configs) are np.float64 scalars, which promote."""
    dps, _ = make_params(0)
    opt = getattr(optim, name)(dps, **cfg)
    for step_grads in fixed_grads(6, steps=3):
        for p, g in zip(dps, step_grads):
            p.grad = Tensor(g)
        opt.step()
    for p in dps:
        assert p.data.dtype == np.float32
        for k, v in opt.state[p].items():
            if isinstance(v, np.ndarray):
                assert v.dtype == np.float32, f"state {k} is {v.dtype}"


@pytest.mark.parametrize("betas", [(np.float64(0.9), np.float64(0.99)), [np.float64(0.9), np.float64(0.99)]],
                         ids=["tuple", "list"])
def test_numpy_betas_become_python_floats_given_as_a_tuple_or_a_list(betas):
    opt = optim.Adam([{"params": [_p()], "betas": betas}])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert all(type(b) is float for b in opt.param_groups[0]["betas"])


@pytest.mark.parametrize("name,cfg", ALL_CONFIGS, ids=IDS)
def test_numpy_float64_hyper_parameters_written_into_a_group_later_do_not_promote(name, cfg):
    # a schedule or the user may write np.float64 values into param_groups, past add_param_group's conversion
    results = []
    for to_numpy in (False, True):
        dps, _ = make_params(0)
        opt = getattr(optim, name)(dps, **cfg)
        if to_numpy:
            group = opt.param_groups[0]
            for key, value in group.items():
                if key == "betas":
                    group[key] = tuple(np.float64(b) for b in value)
                elif key != "params" and not isinstance(value, bool):
                    group[key] = np.float64(value)
        for step_grads in fixed_grads(6, steps=3):
            for p, g in zip(dps, step_grads):
                p.grad = Tensor(g)
            opt.step()
        for p in dps:
            for k, v in opt.state[p].items():
                if isinstance(v, np.ndarray):
                    assert v.dtype == np.float32, f"state {k} is {v.dtype}"
        results.append([p.data.copy() for p in dps])
    for a, b in zip(*results):  # the same float32 arithmetic, bit for bit
        np.testing.assert_array_equal(a, b)


def test_gradient_dtype_mismatch_is_an_error():
    p = _p()
    p.grad = Tensor(np.ones(3), dtype=np.float64)
    with pytest.raises(ValueError, match="float64"):
        optim.SGD([p], lr=0.1).step()
    assert p.data.dtype == np.float32


def test_float64_parameters_stay_float64():
    p = nn.Parameter(np.ones(3), dtype=np.float64)
    opt = optim.AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = Tensor(np.ones(3), dtype=np.float64)
        opt.step()
    assert p.data.dtype == np.float64 and opt.state[p]["exp_avg"].dtype == np.float64


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_on_float16_parameters_keeps_float32_moments_and_steps(name):
    # in float16 eps=1e-8 is 0 (a zero gradient gave 0/0 = NaN) and g*g overflows from |g| = 256 on (the
    # update was skipped)
    grads = [np.array([0.0, 300.0, -1000.0, 0.5]), np.array([0.0, -300.0, 60000.0, 0.25])]
    want = nn.Parameter(np.ones(4, np.float32))
    ref = getattr(optim, name)([want], lr=0.1)
    p = nn.Parameter(np.ones(4), dtype=np.float16)
    opt = getattr(optim, name)([p], lr=0.1)
    for g in grads:
        want.grad = Tensor(g)
        ref.step()
        p.grad = Tensor(g, dtype=np.float16)
        opt.step()
        assert p.data.dtype == np.float16
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == np.float32
        np.testing.assert_allclose(p.data, want.data, rtol=1e-3)
    # saved and loaded, the state stays float32 and the run goes on as the original does
    q = nn.Parameter(p.data, dtype=np.float16)
    resumed = getattr(optim, name)([q], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[q]["exp_avg_sq"].dtype == np.float32
    np.testing.assert_array_equal(resumed.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    for o, t in ((opt, p), (resumed, q)):
        t.grad = Tensor(np.full(4, 2.0), dtype=np.float16)
        o.step()
    np.testing.assert_array_equal(q.data, p.data)
    sd = opt.state_dict()  # float16 moments (as an earlier version saved them) are taken, as float32
    sd["state"][0].update(exp_avg=np.full(4, 0.5, np.float16), exp_avg_sq=np.ones(4, np.float16))
    resumed.load_state_dict(sd)
    assert resumed.state[q]["exp_avg"].dtype == np.float32
    sd["state"][0]["exp_avg"] = np.zeros(4, np.int32)  # and integers are still refused
    with pytest.raises(TypeError, match="int32"):
        resumed.load_state_dict(sd)


def test_optimizer_zero_grad():
    dps, _ = make_params(0)
    opt = optim.SGD(dps, lr=0.1)
    for p in dps:
        p.grad = Tensor(np.ones(p.shape, np.float32))
    arr = dps[0].grad.data
    opt.zero_grad(set_to_none=False)
    assert dps[0].grad.data is arr and not arr.any()
    opt.zero_grad()
    assert all(p.grad is None for p in dps)


# --- LR schedules ------------------------------------------------------------------------------------


def _sched_pair(dsched, tsched, lrs=(0.1, 0.03)):
    dps, tps = make_params(0)
    dopt = optim.SGD([{"params": dps[:1], "lr": lrs[0]}, {"params": dps[1:], "lr": lrs[1]}], lr=lrs[0])
    topt = torch.optim.SGD([{"params": tps[:1], "lr": lrs[0]}, {"params": tps[1:], "lr": lrs[1]}], lr=lrs[0])
    return dopt, topt, dsched(dopt), tsched(topt)


def _lr_sequences(dopt, topt, ds, ts, n):
    dseq, tseq = [ds.get_last_lr()], [ts.get_last_lr()]
    for _ in range(n):
        dopt.step()  # no grads: a no-op, but the call order is the real one
        topt.step()
        ds.step()
        ts.step()
        dseq.append(ds.get_last_lr())
        tseq.append(ts.get_last_lr())
    return np.array(dseq), np.array(tseq)


@pytest.mark.parametrize("step_size,gamma", [(1, 0.9), (3, 0.5), (7, 0.1)])
def test_step_lr_matches_torch(step_size, gamma):
    dopt, topt, ds, ts = _sched_pair(lambda o: optim.StepLR(o, step_size, gamma),
                                     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma))
    d, t = _lr_sequences(dopt, topt, ds, ts, 30)
    # distbp: closed form base * gamma**k; torch multiplies by gamma repeatedly: equal to double rounding
    np.testing.assert_allclose(d, t, rtol=1e-12)
    assert [g["lr"] for g in dopt.param_groups] == list(d[-1])


@pytest.mark.parametrize("t_max,eta_min", [(10, 0.0), (25, 0.001), (1, 0.0)])
def test_cosine_annealing_matches_torch(t_max, eta_min):
    dopt, topt, ds, ts = _sched_pair(lambda o: optim.CosineAnnealingLR(o, t_max, eta_min),
                                     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, t_max, eta_min))
    d, t = _lr_sequences(dopt, topt, ds, ts, t_max)
    # torch uses a recursive update, distbp the closed form; they agree to double rounding
    np.testing.assert_allclose(d, t, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(d[-1], eta_min, atol=1e-15)


def test_cosine_annealing_stays_at_eta_min_after_t_max():
    # documented: unlike torch's (periodic) CosineAnnealingLR, distbp holds eta_min after t_max
    p = _p()
    opt = optim.SGD([p], lr=0.1)
    s = optim.CosineAnnealingLR(opt, 5, eta_min=0.01)
    for _ in range(12):
        s.step()
    assert s.get_last_lr() == [pytest.approx(0.01)]


def test_linear_warmup_ramps_then_hands_off():
    p = _p()
    opt = optim.SGD([p], lr=0.2)
    warm, total = 5, 15
    s = optim.LinearWarmupLR(opt, warm, after=optim.CosineAnnealingLR(opt, total - warm).lr_at)
    lrs = [s.get_last_lr()[0]]
    for _ in range(total):
        s.step()
        lrs.append(s.get_last_lr()[0])
    ramp = lrs[:warm]
    np.testing.assert_allclose(ramp, [0.2 * (k + 1) / warm for k in range(warm)], rtol=1e-12)
    np.testing.assert_allclose(np.diff(ramp), 0.2 / warm, rtol=1e-9)  # linear: constant increments
    # then the cosine, from the full lr, over the remaining steps
    expected_after = [0.2 * (1 + math.cos(math.pi * k / (total - warm))) / 2 for k in range(total - warm + 1)]
    np.testing.assert_allclose(lrs[warm:], expected_after, rtol=1e-12, atol=1e-15)
    assert lrs[warm] == pytest.approx(0.2)


def test_linear_warmup_matches_torch_linear_lr_and_then_constant():
    warm = 4
    dopt, topt, ds, ts = _sched_pair(
        lambda o: optim.LinearWarmupLR(o, warm),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
    )
    d, t = _lr_sequences(dopt, topt, ds, ts, 12)
    np.testing.assert_allclose(d, t, rtol=1e-12)
    np.testing.assert_allclose(d[warm - 1:], np.tile([0.1, 0.03], (12 - warm + 2, 1)), rtol=1e-12)


def test_lambda_lr_matches_torch():
    fn = lambda t: 0.95 ** t if t % 2 else 1 / (t + 1)  # noqa: E731
    dopt, topt, ds, ts = _sched_pair(lambda o: optim.LambdaLR(o, fn),
                                     lambda o: torch.optim.lr_scheduler.LambdaLR(o, fn))
    d, t = _lr_sequences(dopt, topt, ds, ts, 15)
    np.testing.assert_allclose(d, t, rtol=1e-12)


@pytest.mark.parametrize("make", [lambda o: optim.LambdaLR(o, lambda t: np.cos(0.1 * t)),
                                  lambda o: optim.StepLR(o, 1, gamma=np.float64(0.5))], ids=["lambda", "step"])
def test_a_schedule_sets_python_float_rates_and_the_steps_stay_float32(make):
    # a np.float64 rate turned Adam's update into a float64 temporary on every step
    p = nn.Parameter(np.ones(3, np.float32))
    opt = optim.Adam([p], lr=0.1)
    schedule = make(opt)
    for _ in range(3):
        p.grad = Tensor(np.ones(3, np.float32))
        opt.step()
        schedule.step()
        assert type(opt.param_groups[0]["lr"]) is float
    assert p.data.dtype == np.float32 and opt.state[p]["exp_avg"].dtype == np.float32


def test_a_schedule_that_gives_a_rate_that_is_not_a_finite_non_negative_number_is_refused():
    opt = optim.SGD([nn.Parameter(np.ones(3, np.float32))], lr=0.1)
    schedule = optim.LambdaLR(opt, lambda t: float("nan") if t == 2 else 1.0)
    schedule.step()
    with pytest.raises(ValueError, match="LambdaLR: learning rate nan at step 2"):
        schedule.step()


def test_schedule_drives_the_optimizer_steps():
    p = nn.Parameter(np.zeros(1, np.float32))
    opt = optim.SGD([p], lr=1.0)
    s = optim.StepLR(opt, 2, gamma=0.5)
    for _ in range(6):
        p.grad = Tensor(np.ones(1, np.float32))
        opt.step()
        s.step()
    # lrs used: 1, 1, .5, .5, .25, .25
    np.testing.assert_allclose(p.data, [-3.5], rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda o: optim.StepLR(o, 3, 0.5),
    lambda o: optim.CosineAnnealingLR(o, 12, 1e-4),
    lambda o: optim.LinearWarmupLR(o, 4, after=optim.CosineAnnealingLR(o, 10).lr_at),
    lambda o: optim.LambdaLR(o, lambda t: 1 / (1 + t)),
], ids=["step", "cosine", "warmup", "lambda"])
def test_scheduler_state_dict_round_trip(make):
    def fresh():
        ps = [_p(), _p()]
        opt = optim.SGD([{"params": ps[:1], "lr": 0.1}, {"params": ps[1:], "lr": 0.02}], lr=0.1)
        return opt, make(opt)

    ref_opt, ref = fresh()
    ref_lrs = []
    for _ in range(15):
        ref.step()
        ref_lrs.append(ref.get_last_lr())

    opt, s = fresh()
    for _ in range(7):
        s.step()
    sd = pickle.loads(pickle.dumps(s.state_dict()))
    osd = opt.state_dict()
    s.step()  # the live scheduler moves on; the saved state must not

    opt2, s2 = fresh()
    opt2.load_state_dict(osd)
    s2.load_state_dict(sd)
    assert s2.get_last_lr() == ref_lrs[6]
    lrs = []
    for _ in range(8):
        s2.step()
        lrs.append(s2.get_last_lr())
    assert lrs == ref_lrs[7:]


@pytest.mark.parametrize("factory,match", [
    (lambda o: optim.StepLR(o, 0), "step_size"),
    (lambda o: optim.CosineAnnealingLR(o, 0), "t_max"),
    (lambda o: optim.LinearWarmupLR(o, 0), "warmup_steps"),
], ids=["step", "cosine", "warmup"])
def test_scheduler_rejects_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory(optim.SGD([_p()], lr=0.1))


def test_a_schedule_refuses_a_group_added_after_it():
    # it left the new group at its own rate, unscheduled (PyTorch's StepLR decays it too)
    a, b = _p(), _p()
    opt = optim.SGD([a], lr=0.1)
    schedule = optim.StepLR(opt, 2, 0.5)
    opt.add_param_group({"params": [b], "lr": 1.0})
    with pytest.raises(ValueError, match="2 parameter groups and the schedule was made for 1: make the schedule after"):
        schedule.step()
    assert schedule.state_dict()["last_step"] == 0  # the refused step is not counted


def test_a_rate_changed_outside_the_schedule_is_refused_not_overwritten():
    # PyTorch chains schedules on one optimizer and keeps a rate set by hand; these are functions of the
    # step, which overwrote both silently
    opt = optim.SGD([_p()], lr=0.1)
    first, second = optim.StepLR(opt, 2, 0.5), optim.StepLR(opt, 3, 0.1)
    first.step(), second.step()
    first.step()  # the rate halves here
    with pytest.raises(ValueError, match="group 0's lr is 0.05, but this schedule set 0.1: it was changed outside"):
        second.step()
    assert second.state_dict()["last_step"] == 1  # the refused step is not counted
    opt = optim.SGD([_p()], lr=0.1)
    schedule = optim.StepLR(opt, 10, 0.5)
    schedule.step()
    opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(ValueError, match="changed outside the schedule"):
        schedule.step()
    optim.StepLR(opt, 10, 0.5).step()  # a schedule made after the change takes it as its base


def test_warmup_takes_the_schedule_after_it_or_its_rate_function_and_refuses_anything_else():
    opt = optim.SGD([_p()], lr=0.2)
    given_whole = optim.LinearWarmupLR(opt, 2, after=optim.CosineAnnealingLR(opt, 4))
    rates = [given_whole.get_last_lr()[0]]
    for _ in range(6):
        given_whole.step()
        rates.append(given_whole.get_last_lr()[0])
    opt2 = optim.SGD([_p()], lr=0.2)
    given_rate = optim.LinearWarmupLR(opt2, 2, after=optim.CosineAnnealingLR(opt2, 4).lr_at)
    for k in range(6):
        given_rate.step()
        assert given_rate.get_last_lr()[0] == rates[k + 1]
    with pytest.raises(TypeError, match="after must be a schedule or its lr_at"):
        optim.LinearWarmupLR(opt, 2, after=0.5)


def test_an_optimizer_given_one_tensor_instead_of_a_list_says_so():
    with pytest.raises(TypeError, match=r"not one tensor: pass \[p\]"):
        optim.SGD(_p(), lr=0.1)
    assert optim.SGD([_p()]).param_groups[0]["lr"] == 1e-3  # PyTorch's default


def test_a_gradient_assigned_as_an_array_is_named():
    p = _p()
    p.grad = np.ones(3, np.float32)  # PyTorch refuses the assignment; distbp says so at the step
    with pytest.raises(TypeError, match=r"the .grad of a parameter of shape \(3,\) is a ndarray, not a Tensor"):
        optim.SGD([p], lr=0.1).step()
