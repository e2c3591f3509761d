#!/usr/bin/env python
"""Time one full SGD training step of distbp against a hand-written numpy floor and PyTorch CPU.

One run, one BLAS thread per process. A training step is forward, loss, backward, SGD update and
zeroing the gradients. Three networks:

  MLP-big    784-1024-1024-10, batch 256   (BLAS-bound: how close is distbp to the numpy floor?)
  MLP-small  64-128-10, batch 64           (per-op overhead dominates)
  CNN        Conv2d(1,32,3,p=1)-ReLU-MaxPool2d(2)-Flatten-Linear(6272,10), 28x28x1, batch 64
  charlm     `distbp train --model charlm`'s transformer as it trains by default: vocabulary 96, 64
             positions, width 64, 2 pre-norm blocks of 4 heads, batch 32 (distbp and PyTorch only: no
             hand-written numpy transformer)

For both MLPs distbp's forward (model + loss, recording the graph) and backward are also timed alone.

Heap: the process keeps freed memory for reuse (distbp.train.launch.keep_freed_memory(), as `distbp train`
sets it), for every implementation alike; the transformer's step otherwise faults in fresh pages for its
large temporaries.

Method: fixed-seed float32 data; every implementation starts from distbp's initial weights; one step
of distbp, numpy and torch is checked to agree (loss, gradients, updated weights) before any timing;
warm-up; each implementation's loop length is calibrated so one measurement takes ~0.4 s; the repeats
are interleaved (A B C A B C ...) and the median per-step time is reported.

    python bench/bench_core.py                 # full run (~1-2 min on 2 cores)
    python bench/bench_core.py --quick         # smoke test (a few seconds)
    python bench/bench_core.py --json out.json # also write the results
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from machine import cpu_model, usable_cores
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import distbp
import distbp.nn as dnn
import distbp.models  # noqa: F401 -- distbp.models.charlm
import distbp.nn.functional as DF
from distbp.optim import SGD as DSGD
from distbp.train.launch import keep_freed_memory

LR = 0.01
SEED = 0


# ================================================================================================
# Implementations. Each builder returns a zero-argument `step()` doing one full training step.
# ================================================================================================


def build_distbp_mlp(sizes):
    distbp.manual_seed(SEED)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(dnn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(dnn.ReLU())
    return dnn.Sequential(*layers)


def build_distbp_cnn():
    distbp.manual_seed(SEED)
    return dnn.Sequential(
        dnn.Conv2d(1, 32, 3, padding=1), dnn.ReLU(), dnn.MaxPool2d(2), dnn.Flatten(), dnn.Linear(32 * 14 * 14, 10)
    )


class DistbpImpl:
    def __init__(self, model, x, y):
        self.model = model
        self.opt = DSGD(model.parameters(), lr=LR)
        self.x = distbp.Tensor(x)
        self.y = distbp.Tensor(y)

    def step(self):
        loss = DF.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def forward(self):
        return DF.cross_entropy(self.model(self.x), self.y)

    def timed_backward(self, n):
        """Total seconds spent in n backward calls (the forward and the zeroing are not timed)."""
        total = 0.0
        model, x, y, opt, clock = self.model, self.x, self.y, self.opt, time.perf_counter
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = DF.cross_entropy(model(x), y)
            t0 = clock()
            loss.backward()
            total += clock() - t0
        opt.zero_grad(set_to_none=True)
        return total

    def params(self):
        return [p.data for p in self.model.parameters()]


def numpy_mlp_step_fn(params, x, y, lr):
    """The hand-written floor: params is [[W (out, in), b (out,)], ...] float32, updated in place."""
    n = x.shape[0]
    rows = np.arange(n)
    last = len(params) - 1
    inv_n = np.float32(1.0 / n)

    def step(keep=None):
        acts = [x]
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T
            h += b
            if i < last:
                np.maximum(h, 0, out=h)
            acts.append(h)
        # stable fused softmax-cross-entropy
        z = h - h.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = (np.log(s[:, 0]) - z[rows, y]).sum() * inv_n
        g = e
        g /= s
        g[rows, y] -= 1
        g *= inv_n
        for i in range(last, -1, -1):
            w, b = params[i]
            a = acts[i]
            dw = g.T @ a
            db = g.sum(axis=0)
            if i:  # no dx for the first layer
                g = g @ w
                g *= a > 0  # relu backward (a is the relu output)
            if keep is not None:
                keep[2 * i : 2 * i + 2] = [dw, db]
            w -= lr * dw
            b -= lr * db
        return loss

    return step


def numpy_cnn_step_fn(params, x, y, lr):
    """Conv2d(C->O, 3x3, pad 1) by im2col + matmul, ReLU, 2x2/2 max-pool, Linear; float32 throughout.

    The im2col copy orders the output pixels pool-window-major, (di, dj, ph, pw) for pixel
    (2*ph+di, 2*pw+dj), so that pooling and its backward work on four contiguous (ph, pw) planes.
    (The obvious reshape(n, o, 14, 2, 14, 2).max(axis=(3, 5)) costs ~70 ms here: numpy reduces
    size-2 strided axes very slowly. This floor takes the fast road.)
    """
    wc, bc, w2, b2 = params
    n, c, hh, ww = x.shape
    o = wc.shape[0]
    k = wc[0].size  # c * 3 * 3
    wc2 = wc.reshape(o, k)  # a view: updating wc updates it
    rows = np.arange(n)
    inv_n = np.float32(1.0 / n)
    ph, pw = hh // 2, ww // 2
    L, P = hh * ww, ph * pw

    def step(keep=None):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        s0, s1, s2, s3 = xp.strides
        win = np.lib.stride_tricks.as_strided(
            xp, shape=(n, c, 3, 3, 2, 2, ph, pw), strides=(s0, s1, s2, s3, s2, s3, 2 * s2, 2 * s3))
        cols = np.ascontiguousarray(win).reshape(n, k, L)  # (n, c*kh*kw, di*dj*ph*pw)
        conv = wc2 @ cols  # (n, o, L)
        conv += bc[:, None]
        np.maximum(conv, 0, out=conv)
        c4 = conv.reshape(n, o, 4, P)
        pooled = np.maximum(c4[:, :, 0], c4[:, :, 1])
        np.maximum(pooled, c4[:, :, 2], out=pooled)
        np.maximum(pooled, c4[:, :, 3], out=pooled)
        f = pooled.reshape(n, o * P)  # (o, ph, pw) order: NCHW flatten
        h = f @ w2.T
        h += b2
        z = h - h.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = (np.log(s[:, 0]) - z[rows, y]).sum() * inv_n
        g = e
        g /= s
        g[rows, y] -= 1
        g *= inv_n
        dw2 = g.T @ f
        db2 = g.sum(axis=0)
        gp = (g @ w2).reshape(n, o, P)
        gp *= pooled > 0  # relu backward folded in: a zero max means the whole window was clipped
        gconv = (c4 == pooled[:, :, None, :]) * gp[:, :, None, :]  # max-pool backward
        gconv = gconv.reshape(n, o, L)
        dwc = (gconv @ cols.transpose(0, 2, 1)).sum(axis=0).reshape(wc.shape)  # no dx: first layer
        dbc = gconv.sum(axis=(0, 2))
        if keep is not None:
            keep[:] = [dwc, dbc, dw2, db2]
        for p, gp_ in zip(params, (dwc, dbc, dw2, db2)):
            p -= lr * gp_
        return loss

    return step


class NumpyImpl:
    def __init__(self, kind, dmodel, x, y):
        arrays = [p.data.copy() for p in dmodel.parameters()]
        if kind == "mlp":
            self.params = [[arrays[i], arrays[i + 1]] for i in range(0, len(arrays), 2)]
            self._step = numpy_mlp_step_fn(self.params, x, y, LR)
        else:
            self.params = arrays
            self._step = numpy_cnn_step_fn(self.params, x, y, LR)

    def step(self, keep=None):
        return self._step(keep)

    def flat_params(self):
        if isinstance(self.params[0], list):
            return [a for pair in self.params for a in pair]
        return list(self.params)


def torch_model_like(dmodel):
    mods = []
    for m in dmodel:
        if isinstance(m, dnn.Linear):
            t = torch.nn.Linear(m.in_features, m.out_features)
        elif isinstance(m, dnn.Conv2d):
            t = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
        elif isinstance(m, dnn.ReLU):
            t = torch.nn.ReLU()
        elif isinstance(m, dnn.MaxPool2d):
            t = torch.nn.MaxPool2d(m.kernel_size, m.stride, m.padding)
        elif isinstance(m, dnn.Flatten):
            t = torch.nn.Flatten(m.start_axis)
        else:
            raise TypeError(type(m))
        if hasattr(m, "weight"):
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(m.weight.data))
                t.bias.copy_(torch.from_numpy(m.bias.data))
        mods.append(t)
    return torch.nn.Sequential(*mods)


class TorchImpl:
    def __init__(self, dmodel, x, y):
        self.model = torch_model_like(dmodel)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)

    def loss(self):
        return torch.nn.functional.cross_entropy(self.model(self.x), self.y)

    def step(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def step_keep_grads(self):
        loss = self.loss()
        loss.backward()
        grads = [p.grad.numpy().copy() for p in self.model.parameters()]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, grads

    def params(self):
        return [p.detach().numpy() for p in self.model.parameters()]


# --- the transformer: distbp's CharLM and the same network written in PyTorch --------------------------

CHARLM = dict(vocab=96, block=64, d_model=64, n_layers=2, n_heads=4, batch=32)


class TorchCharLM(torch.nn.Module):
    """distbp.models.CharLM in PyTorch, module for module under the same names (so one state dict fits both)."""

    class Attention(torch.nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, c))

    class MLP(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc, self.proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

        def forward(self, x):
            return self.proj(torch.nn.functional.gelu(self.fc(x), approximate="tanh"))

    class Block(torch.nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(d)  # registered in distbp's order: parameters() lists them alike
            self.attn = TorchCharLM.Attention(d, heads)
            self.ln2 = torch.nn.LayerNorm(d)
            self.mlp = TorchCharLM.MLP(d)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    def __init__(self, vocab, block, d_model, n_layers, n_heads):
        super().__init__()
        self.token, self.position = torch.nn.Embedding(vocab, d_model), torch.nn.Embedding(block, d_model)
        self.blocks = torch.nn.ModuleList(TorchCharLM.Block(d_model, n_heads) for _ in range(n_layers))
        self.norm, self.head = torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, vocab)

    def forward(self, codes):
        x = self.token(codes) + self.position(torch.arange(codes.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_distbp_charlm():
    distbp.manual_seed(SEED)
    c = CHARLM
    return distbp.models.charlm(c["vocab"], c["block"], c["d_model"], c["n_layers"], c["n_heads"])


class TorchCharLMImpl(TorchImpl):
    def __init__(self, dmodel, x, y):
        c = CHARLM
        self.model = TorchCharLM(c["vocab"], c["block"], c["d_model"], c["n_layers"], c["n_heads"])
        self.model.load_state_dict({n: torch.from_numpy(p.data.copy()) for n, p in dmodel.named_parameters()})
        names = [n for n, _ in self.model.named_parameters()]
        assert names == [n for n, _ in dmodel.named_parameters()], "the two models list their parameters alike"
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)

    def loss(self):
        logits = self.model(self.x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))


# ================================================================================================
# Correctness: one step of each must compute the same thing
# ================================================================================================


def check_same_step(name, make_d, make_np, make_t, tol=1e-4):
    """Fresh instances; one step each; compare loss, gradients and updated weights."""
    d, nimp, t = make_d(), make_np(), make_t()
    # distbp: keep the grads by stepping by hand (no zero_grad before reading them)
    loss_d = d.forward()
    loss_d.backward()
    grads_d = [p.grad.data.copy() for p in d.model.parameters()]
    d.opt.step()
    d.opt.zero_grad(set_to_none=True)
    params_d = d.params()
    loss_d = float(loss_d.item())

    lines = []
    ok = True

    def compare(label, loss_o, grads_o, params_o):
        nonlocal ok
        dl = abs(loss_o - loss_d)
        # gradients relative to their own scale (the update itself is ~lr*g, far below 1e-4 in absolute terms)
        dg = max(float(np.max(np.abs(a - b))) / (float(np.max(np.abs(a))) + 1e-30) for a, b in zip(grads_d, grads_o))
        dp = max(float(np.max(np.abs(a - b))) for a, b in zip(params_d, params_o))
        good = dl <= tol and dg <= tol and dp <= tol
        ok = ok and good
        lines.append(
            f"  {name:9s} distbp vs {label:5s}: |dloss|={dl:.1e} max rel|dgrad|={dg:.1e} max|dweight|={dp:.1e}"
            f"  {'ok' if good else 'MISMATCH'}"
        )

    if nimp is not None:
        keep = [None] * len(grads_d)
        loss_n = float(nimp.step(keep))
        compare("numpy", loss_n, keep, nimp.flat_params())
    loss_t, grads_t = t.step_keep_grads()
    compare("torch", float(loss_t.item()), grads_t, t.params())
    print("\n".join(lines))
    assert ok, f"{name}: implementations disagree after one step (tolerance {tol})"


# ================================================================================================
# Timing
# ================================================================================================


def loop_seconds(fn, n):
    clock = time.perf_counter
    t0 = clock()
    for _ in range(n):
        fn()
    return clock() - t0


class Measure:
    """One timed quantity: `run(n)` returns seconds for n iterations."""

    def __init__(self, label, run):
        self.label = label
        self.run = run
        self.n = 1
        self.samples = []  # seconds per iteration, one per repeat

    def calibrate(self, target):
        t = self.run(1)
        n = 1
        while t < target / 8 and n < 1_000_000:  # grow geometrically until the estimate is solid
            n *= 4
            t = self.run(n)
        self.n = max(1, math.ceil(n * target / max(t, 1e-9)))

    def median_ms(self):
        return 1e3 * statistics.median(self.samples)


def time_interleaved(measures, target, repeats, warmup):
    for m in measures:
        for _ in range(warmup):
            m.run(1)
    for m in measures:
        m.calibrate(target)
    for _ in range(repeats):
        for m in measures:  # A B C A B C ...: machine noise hits all alike
            m.samples.append(m.run(m.n) / m.n)


# ================================================================================================
# Machine description
# ================================================================================================


def machine_info():
    cpu = cpu_model()
    usable = usable_cores()
    pools = [
        {k: p.get(k) for k in ("user_api", "internal_api", "version", "threading_layer", "architecture",
                                "num_threads", "filepath")}
        for p in threadpool_info()
    ]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threadpools": pools,
        "platform": platform.platform(),
    }


def print_machine(info):
    print(f"CPU      : {info['cpu']}  ({info['cores']} cores, {info['usable_cores']} usable)")
    print(f"Python   : {info['python']}   numpy {info['numpy']}   torch {info['torch']} "
          f"(threads={info['torch_threads']})   {info['platform']}")
    for p in info["threadpools"]:
        print(f"pool     : {p['internal_api']} {p['version'] or ''} {p['architecture'] or ''} "
              f"threads={p['num_threads']}  {os.path.basename(p['filepath'] or '')}")


# ================================================================================================
# Main
# ================================================================================================

NETWORKS = [
    dict(key="mlp_big", title="MLP-big 784-1024-1024-10, batch 256", kind="mlp", sizes=(784, 1024, 1024, 10),
         batch=256, targets=dict(distbp_over_numpy=1.10, distbp_over_torch=1.0, backward_over_forward=2.5)),
    dict(key="mlp_small", title="MLP-small 64-128-10, batch 64", kind="mlp", sizes=(64, 128, 10),
         batch=64, targets=dict(distbp_over_torch=1.0, backward_over_forward=2.5)),
    dict(key="cnn", title="CNN conv3x3(1->32)-relu-maxpool2-linear(6272->10), 28x28, batch 64", kind="cnn",
         batch=64, targets=dict(distbp_over_torch=2.0)),
    dict(key="charlm", title=(f"charlm transformer: vocab {CHARLM['vocab']}, {CHARLM['block']} positions, width "
                              f"{CHARLM['d_model']}, {CHARLM['n_layers']} blocks x {CHARLM['n_heads']} heads, "
                              f"batch {CHARLM['batch']}"),
         kind="charlm", batch=CHARLM["batch"], targets={}),
]


def make_data(net):
    rng = np.random.default_rng(SEED)
    if net["kind"] == "charlm":  # a window of character codes and the next character at every position
        codes = rng.integers(0, CHARLM["vocab"], (net["batch"], CHARLM["block"] + 1))
        return codes[:, :-1], codes[:, 1:].copy()
    shape = (net["batch"], net["sizes"][0]) if net["kind"] == "mlp" else (net["batch"], 1, 28, 28)
    x = rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, 10, net["batch"]).astype(np.int64)
    return x, y


def run_network(net, target, repeats, warmup):
    x, y = make_data(net)

    builders = {"mlp": lambda: build_distbp_mlp(net["sizes"]), "cnn": build_distbp_cnn, "charlm": build_distbp_charlm}
    dmodel = builders[net["kind"]]
    make_d = lambda: DistbpImpl(dmodel(), x, y)  # noqa: E731
    if net["kind"] == "charlm":
        make_np = lambda: None  # noqa: E731
        make_t = lambda: TorchCharLMImpl(dmodel(), x, y)  # noqa: E731
    else:
        make_np = lambda: NumpyImpl(net["kind"], dmodel(), x, y)  # noqa: E731
        make_t = lambda: TorchImpl(dmodel(), x, y)  # noqa: E731
    check_same_step(net["key"], make_d, make_np, make_t)

    d, nimp, t = make_d(), make_np(), make_t()
    measures = {"distbp": Measure("distbp step", lambda n: loop_seconds(d.step, n))}
    if nimp is not None:
        measures["numpy"] = Measure("numpy step", lambda n: loop_seconds(nimp.step, n))
    measures["torch"] = Measure("torch step", lambda n: loop_seconds(t.step, n))
    if net["kind"] == "mlp":
        measures["distbp_fwd"] = Measure("distbp forward", lambda n: loop_seconds(d.forward, n))
        measures["distbp_bwd"] = Measure("distbp backward", d.timed_backward)
    time_interleaved(list(measures.values()), target, repeats, warmup)

    ms = {k: m.median_ms() for k, m in measures.items()}
    ratios = {"distbp_over_numpy": ms["distbp"] / ms["numpy"]} if "numpy" in ms else {}
    ratios["distbp_over_torch"] = ms["distbp"] / ms["torch"]
    if "distbp_fwd" in ms:
        ratios["backward_over_forward"] = ms["distbp_bwd"] / ms["distbp_fwd"]
    # the same ratios taken repeat by repeat (the interleaved samples of one repeat saw the same machine
    # state), then the median: a cross-check that is less sensitive to noise drifting across the run
    pairs = {"distbp_over_numpy": ("distbp", "numpy"), "distbp_over_torch": ("distbp", "torch"),
             "backward_over_forward": ("distbp_bwd", "distbp_fwd")}
    paired = {k: statistics.median(a / b for a, b in zip(measures[pairs[k][0]].samples, measures[pairs[k][1]].samples))
              for k in ratios}
    checks = {k: {"value": ratios[k], "target": v, "pass": ratios[k] <= v} for k, v in net["targets"].items()}
    return {
        "title": net["title"],
        "ms": ms,
        "samples_ms": {k: [1e3 * s for s in m.samples] for k, m in measures.items()},
        "iters_per_sample": {k: m.n for k, m in measures.items()},
        "ratios": ratios,
        "ratios_paired_median": paired,
        "checks": checks,
    }


RATIO_LABELS = {
    "distbp_over_numpy": "distbp / numpy",
    "distbp_over_torch": "distbp / torch",
    "backward_over_forward": "backward / forward (distbp)",
}
MS_LABELS = {
    "distbp": "distbp  step",
    "numpy": "numpy   step (hand-written floor)",
    "torch": "torch   step",
    "distbp_fwd": "distbp  forward (model + loss)",
    "distbp_bwd": "distbp  backward",
}


def print_table(results):
    w = 37
    print()
    print("=" * 78)
    print(f"{'':{w}s} {'ms (median)':>12s} {'min..max over repeats':>24s}")
    print(f"{'':{w}s} ratios: of the medians; (paired) = median of per-repeat ratios")
    for res in results.values():
        print("-" * 78)
        print(res["title"])
        for k, v in res["ms"].items():
            s = res["samples_ms"][k]
            print(f"  {MS_LABELS[k]:{w - 2}s} {v:12.3f} {min(s):11.3f} .. {max(s):<10.3f}"
                  f" (x{res['iters_per_sample'][k]})")
        for k, v in res["ratios"].items():
            c = res["checks"].get(k)
            tail = f"target <= {c['target']:.2f}   {'PASS' if c['pass'] else 'MISS'}" if c else "(no target)"
            print(f"  {RATIO_LABELS[k]:{w - 2}s} {v:12.3f}   (paired {res['ratios_paired_median'][k]:.3f})   {tail}")
    print("=" * 78)
    checks = [c for r in results.values() for c in r["checks"].values()]
    print(f"{sum(c['pass'] for c in checks)}/{len(checks)} targets met")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke test, not a measurement")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (default 9)")
    ap.add_argument("--target-seconds", type=float, default=None, help="seconds per measurement (default 0.4)")
    args = ap.parse_args()
    target = args.target_seconds or (0.02 if args.quick else 0.4)
    repeats = args.repeats or (2 if args.quick else 9)
    warmup = 1 if args.quick else 3

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t_start = time.perf_counter()
    heap = keep_freed_memory()
    with threadpool_limits(limits=1):
        info = machine_info()
        info["heap"] = heap
        print_machine(info)
        print(f"mode     : {'quick' if args.quick else 'full'}: {repeats} interleaved repeats of ~{target:g} s each, "
              f"median reported; lr={LR}, seed={SEED}")
        print(f"heap     : {heap or 'the C library default'}")
        print("one-step agreement (tolerance 1e-4):")
        results = {}
        for net in NETWORKS:
            results[net["key"]] = run_network(net, target, repeats, warmup)
    print_table(results)
    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.1f} s")
    if args.json:
        out = {"machine": info, "mode": "quick" if args.quick else "full", "repeats": repeats,
               "target_seconds": target, "elapsed_s": elapsed, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
