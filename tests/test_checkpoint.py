"""Checkpoints: the safetensors layout, model + optimizer round trips, refusing bad files, atomic writes."""

import json
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from distbp import models, optim
from distbp.autograd import Tensor, manual_seed
from distbp.autograd.ops import cross_entropy
from distbp import serialization as checkpoint_module
from distbp.serialization import CHECKSUM_KEY
from distbp.train.checkpoint import (
    FORMAT, CheckpointError, load_checkpoint, load_safetensors, load_weights, save_checkpoint, save_safetensors,
)

# --- safetensors layout ----------------------------------------------------------------------------------

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
SHAPES = [
    pytest.param((), id="scalar"),
    pytest.param((0,), id="empty"),
    pytest.param((5,), id="vector"),
    pytest.param((2, 3, 4), id="3d"),
    pytest.param((1, 0, 3), id="empty-3d"),
]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f":
        a = (rng.standard_normal(shape) * 100).astype(dtype)
        if a.size > 2:
            a.flat[0], a.flat[1] = np.inf, np.nan  # bit patterns survive, not just values
        return a
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if a.size >= 2:
        a.flat[0], a.flat[-1] = info.min, info.max
    return a


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_safetensors_round_trip(tmp_path, shape):
    arrays = {f"t/{np.dtype(d).name}": _sample(d, shape, i) for i, d in enumerate(DTYPES)}
    path = tmp_path / "a.safetensors"
    save_safetensors(path, arrays, {"note": "hello", "n": 3})
    got, meta = load_safetensors(path)
    assert meta == {"note": "hello", "n": "3"}  # metadata values are strings, as the format says
    assert list(got) == list(arrays)
    for name, arr in arrays.items():
        assert _same(got[name], arr), name
        assert got[name].flags.writeable, f"{name} loads read-only"


def test_safetensors_layout(tmp_path):
    path = tmp_path / "a.safetensors"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_safetensors(path, {"a": a, "b": np.array([1, 2], np.int64)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # the data starts 8-byte aligned
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}
    assert len(raw) == 8 + n + 40
    assert raw[8 + n:8 + n + 24] == a.astype("<f4").tobytes()


def test_safetensors_non_contiguous_input(tmp_path):
    a = np.arange(12, dtype=np.float64).reshape(3, 4).T  # Fortran-ordered view
    b = np.arange(20, dtype=np.int32)[::3]
    save_safetensors(tmp_path / "x", {"a": a, "b": b})
    got, _ = load_safetensors(tmp_path / "x")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_safetensors_big_endian_input(tmp_path):
    a = np.arange(5, dtype=">f4")
    save_safetensors(tmp_path / "x", {"a": a})
    got, _ = load_safetensors(tmp_path / "x")
    assert got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], a)


def test_safetensors_unsupported_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="complex"):
        save_safetensors(tmp_path / "x", {"c": np.zeros(2, np.complex64)})
    assert not (tmp_path / "x").exists()


def test_interoperates_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed")
    arrays = {f"{np.dtype(d).name}": _sample(d, (3, 4), i) for i, d in enumerate(DTYPES)}
    arrays["empty"] = np.zeros((0, 2), np.float32)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, arrays, {"who": "distbp"})
    theirs_read = st.load_file(str(ours))
    assert set(theirs_read) == set(arrays)
    for name, arr in arrays.items():
        assert _same(theirs_read[name], arr), name
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(arrays, str(theirs), metadata={"who": "safetensors"})
    got, meta = load_safetensors(theirs)
    assert meta == {"who": "safetensors"}
    assert set(got) == set(arrays)
    for name, arr in arrays.items():
        assert _same(got[name], arr), name


# --- model + optimizer -----------------------------------------------------------------------------------


def make(hidden=(32,), opt="adam", seed=0):
    manual_seed(seed)
    model = models.mlp((64,), 10, hidden)
    params = list(model.parameters())
    if opt == "adam":
        optimizer = optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    elif opt == "adamw":
        optimizer = optim.AdamW(params, lr=2e-3)
    else:
        optimizer = optim.SGD(params, lr=0.1, momentum=0.9)
    return model, optimizer


def train(model, optimizer, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((8, 64)).astype(np.float32)
        y = rng.integers(0, 10, 8)
        optimizer.zero_grad()
        cross_entropy(model(Tensor(x)), y).backward()
        optimizer.step()


def snapshot(model, optimizer):
    """Copies of everything a load may change."""
    sd = optimizer.state_dict()
    return (
        {k: v.copy() for k, v in model.state_dict().items()},
        {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for i, e in sd["state"].items()},
        [dict(g) for g in sd["param_groups"]],
    )


def assert_snapshots_equal(a, b):
    (ma, sa, ga), (mb, sb, gb) = a, b
    assert list(ma) == list(mb)
    for k in ma:
        assert _same(ma[k], mb[k]), f"model {k}"
    assert set(sa) == set(sb)
    for i in sa:
        assert set(sa[i]) == set(sb[i]), f"optimizer state {i}"
        for k in sa[i]:
            va, vb = sa[i][k], sb[i][k]
            if isinstance(va, np.ndarray):
                assert isinstance(vb, np.ndarray) and _same(va, vb), f"optimizer state {i}/{k}"
            else:
                assert va == vb and type(va) is type(vb), f"optimizer state {i}/{k}: {va!r} vs {vb!r}"
    assert ga == gb


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_checkpoint_round_trip(tmp_path, opt):
    model, optimizer = make(opt=opt, seed=1)
    train(model, optimizer, 3)
    state = {"step": 3, "epoch": 1, "batch": 2, "rng": {"a": [1, 2, 3]}, "note": "x"}
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, optimizer, state)
    saved = snapshot(model, optimizer)

    model2, optimizer2 = make(opt=opt, seed=2)  # different initialisation, no optimizer state yet
    assert not _same(model2.state_dict()["0.weight"], saved[0]["0.weight"])
    got = load_checkpoint(path, model2, optimizer2)
    assert got == state
    assert_snapshots_equal(snapshot(model2, optimizer2), saved)
    if opt != "sgd":
        steps = [e["step"] for e in optimizer2.state_dict()["state"].values()]
        assert steps == [3] * len(list(model.parameters()))
        assert all(type(s) is int for s in steps)
        assert optimizer2.param_groups[0]["betas"] == (0.9, 0.999)
    # training on from the restored state is exactly training on from the original
    train(model, optimizer, 2, seed=9)
    train(model2, optimizer2, 2, seed=9)
    assert_snapshots_equal(snapshot(model2, optimizer2), snapshot(model, optimizer))


def test_checkpoint_of_different_model_is_refused_unchanged(tmp_path):
    small, small_opt = make(hidden=(32,))
    train(small, small_opt, 1)
    path = tmp_path / "ck"
    save_checkpoint(path, small, small_opt, {"step": 1})
    big, big_opt = make(hidden=(64,), seed=3)
    train(big, big_opt, 2)
    before = snapshot(big, big_opt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, big, big_opt)
    msg = str(err.value)
    assert "different model" in msg and "'0.weight'" in msg and "[32, 64]" in msg and "[64, 64]" in msg
    assert_snapshots_equal(snapshot(big, big_opt), before)


def test_checkpoint_with_extra_or_missing_layer_is_refused(tmp_path):
    deep, deep_opt = make(hidden=(32, 32))
    save_checkpoint(tmp_path / "deep", deep, deep_opt, {})
    shallow, shallow_opt = make(hidden=(32,))
    save_checkpoint(tmp_path / "shallow", shallow, shallow_opt, {})
    before = snapshot(shallow, shallow_opt)
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(tmp_path / "deep", shallow, shallow_opt)
    assert_snapshots_equal(snapshot(shallow, shallow_opt), before)
    with pytest.raises(CheckpointError, match="different model.*'2.weight'"):
        load_checkpoint(tmp_path / "shallow", deep, deep_opt)


def test_checkpoint_missing_array_leaves_target_unchanged(tmp_path):
    model, optimizer = make(opt="sgd")
    train(model, optimizer, 2)
    save_checkpoint(tmp_path / "ck", model, optimizer, {})
    arrays, meta = load_safetensors(tmp_path / "ck")
    del arrays["model/0.weight"]
    save_safetensors(tmp_path / "ck", arrays, meta)
    target, target_opt = make(opt="sgd", seed=4)
    target_opt.param_groups[0]["lr"] = 0.5
    before = snapshot(target, target_opt)
    with pytest.raises(CheckpointError, match="0.weight"):
        load_checkpoint(tmp_path / "ck", target, target_opt)
    assert_snapshots_equal(snapshot(target, target_opt), before)


def test_checkpoint_of_different_optimizer_is_refused(tmp_path):
    model, optimizer = make(opt="sgd")
    train(model, optimizer, 2)
    save_checkpoint(tmp_path / "ck", model, optimizer, {})
    target, target_opt = make(opt="adam")
    before = snapshot(target, target_opt)
    try:
        load_checkpoint(tmp_path / "ck", target, target_opt)
    except CheckpointError:
        assert_snapshots_equal(snapshot(target, target_opt), before)
        return
    # accepted: then the optimizer must still be a working, consistent Adam
    train(target, target_opt, 1)
    assert "momentum" not in target_opt.param_groups[0], "SGD hyper-parameters leaked into Adam"


# --- damaged and foreign files ---------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path):
    model, optimizer = make()
    train(model, optimizer, 1)
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, model, optimizer, {"step": 1})
    return path


def test_truncated_checkpoint(tmp_path, good_checkpoint):
    raw = good_checkpoint.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cuts = sorted({0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(raw)) // 2, len(raw) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}"
        path.write_bytes(raw[:cut])
        model, optimizer = make()
        before = snapshot(model, optimizer)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, model, optimizer)
        assert f"cut{cut}" in str(err.value)
        assert_snapshots_equal(snapshot(model, optimizer), before)


@pytest.mark.parametrize("kind", ["random", "zeros", "text", "png"])
def test_garbage_checkpoint(tmp_path, kind):
    rng = np.random.default_rng(0)
    content = {
        "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "zeros": bytes(4096),
        "text": b"this is not a checkpoint\n" * 40,
        "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    }[kind]
    path = tmp_path / "garbage"
    path.write_bytes(content)
    model, optimizer = make()
    with pytest.raises(CheckpointError, match="garbage"):
        load_checkpoint(path, model, optimizer)


def test_missing_checkpoint(tmp_path):
    model, optimizer = make()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model, optimizer)


def _with_header(header, body=b""):
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


_SIG_OK = json.dumps({"format": FORMAT})
BAD_HEADERS = [
    pytest.param(_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
                 "not a distbp checkpoint", id="plain-safetensors"),
    pytest.param(_with_header({"__metadata__": {"distbp": json.dumps({"format": "other-9"})}}),
                 "unknown checkpoint format", id="other-format"),
    pytest.param(_with_header({"__metadata__": {"distbp": "{not json"}}), "not a distbp checkpoint",
                 id="metadata-not-json"),
    pytest.param(struct.pack("<Q", 9) + b"{not json", "not JSON", id="header-not-json"),
    pytest.param(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "not JSON", id="header-not-utf8"),
    pytest.param(_with_header([1, 2]), "not a JSON object", id="header-list"),
    pytest.param(struct.pack("<Q", 10**12) + b"{}", "runs past", id="header-length-huge"),
    pytest.param(_with_header({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "'a'", id="no-dtype"),
    pytest.param(_with_header({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "'a'",
                 id="unknown-dtype"),
    pytest.param(_with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
                 "does not fit", id="size-mismatch"),
    pytest.param(_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8)),
                 "does not fit", id="range-past-end"),
    pytest.param(_with_header({"a": 7}), "'a'", id="entry-not-object"),
    pytest.param(_with_header({"__metadata__": 5}), "checkpoint", id="metadata-not-object"),
    pytest.param(_with_header({"__metadata__": {"distbp": 5}}), "checkpoint", id="metadata-value-not-string"),
    pytest.param(_with_header({"__metadata__": {"distbp": "[1]"}}), "checkpoint", id="distbp-meta-not-object"),
    pytest.param(_with_header({"__metadata__": {"distbp": _SIG_OK}}), "checkpoint", id="no-signature"),
    pytest.param(_with_header({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, bytes(16)),
                 "'a'", id="negative-shape"),
]


@pytest.mark.parametrize("content, words", BAD_HEADERS)
def test_wrong_header(tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    model, optimizer = make()
    train(model, optimizer, 1)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model, optimizer)
    assert "bad.safetensors" in str(err.value) and words in str(err.value)
    assert_snapshots_equal(snapshot(model, optimizer), before)


def _entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# the safetensors format: the byte ranges tile the data section exactly; shapes are lists of integers >= 0
BAD_LAYOUTS = [
    pytest.param({"a": _entry([2], 0, 8), "b": _entry([2], 0, 8)}, 8, "'b'.*overlaps.*'a'", id="same-range"),
    pytest.param({"a": _entry([2], 0, 8), "b": _entry([2], 4, 12)}, 12, "'b'.*overlaps.*'a'", id="overlap"),
    pytest.param({"a": _entry([4], 0, 16), "b": _entry([0], 8, 8)}, 16, "'b'.*overlaps.*'a'",
                 id="empty-inside-other"),
    pytest.param({"a": _entry([2], 0, 8), "b": _entry([2], 16, 24)}, 24, "'b'.*bytes 8..16.*'a'", id="gap"),
    pytest.param({"a": _entry([2], 8, 16)}, 16, "'a'.*bytes 0..8", id="gap-at-start"),
    pytest.param({"a": _entry([2], 0, 8)}, 16, "8 trailing bytes.*'a'", id="trailing-bytes"),
    pytest.param({}, 8, "8 trailing bytes", id="data-without-entries"),
    pytest.param({"a": _entry([2.7], 0, 8)}, 8, "'a'.*shape", id="float-dimension"),
    pytest.param({"a": _entry([2.0], 0, 8)}, 8, "'a'.*shape", id="integral-float-dimension"),
    pytest.param({"a": _entry([True, 2], 0, 8)}, 8, "'a'.*shape", id="bool-dimension"),
    pytest.param({"a": _entry(["2"], 0, 8)}, 8, "'a'.*shape", id="string-dimension"),
    pytest.param({"a": _entry([-2], 0, 8)}, 8, "'a'.*shape", id="negative-dimension"),
    pytest.param({"a": _entry(2, 0, 8)}, 8, "'a'.*shape", id="shape-not-list"),
    pytest.param({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, 8, "'a'.*data_offsets",
                 id="string-offsets"),
    pytest.param({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, "'a'.*data_offsets",
                 id="float-offsets"),
    pytest.param({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, "'a'.*data_offsets",
                 id="three-offsets"),
    pytest.param({"a": _entry([2], 8, 0)}, 8, "'a'.*does not fit", id="end-before-begin"),
    # 2**64 elements: a size computed in int64 wraps to 0 and would "fit" the empty range
    pytest.param({"a": _entry([2**32, 2**32], 0, 0)}, 0, "'a'.*does not fit", id="huge-shape"),
    pytest.param({"a": _entry([2**62, 4], 0, 0, "U8")}, 0, "'a'.*does not fit", id="huge-shape-u8"),
    # no bytes at all (a 0 in the shape) fits the empty range; numpy still refuses such shapes
    pytest.param({"a": _entry([0, 2**62], 0, 0)}, 0, "'a'.*too large for an array", id="empty-but-huge"),
    pytest.param({"a": _entry([0] * 65, 0, 0)}, 0, "'a'.*at most 64 dimensions", id="65-dimensions"),
]


@pytest.mark.parametrize("header, body_bytes, words", BAD_LAYOUTS)
def test_bad_layout_is_refused_naming_the_entry(tmp_path, header, body_bytes, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_with_header(header, bytes(body_bytes)))
    with pytest.raises(CheckpointError, match=words):
        load_safetensors(path)


def test_entries_in_any_header_order_and_empty_ones_load(tmp_path):
    a, b = np.arange(2, dtype=np.float32), np.arange(3, dtype=np.int64)
    header = {"b": _entry([3], 8, 32, "I64"), "e": _entry([0, 5], 8, 8), "a": _entry([2], 0, 8),
              "z": _entry([0], 32, 32)}
    path = tmp_path / "x.safetensors"
    path.write_bytes(_with_header(header, a.tobytes() + b.tobytes()))
    got, _ = load_safetensors(path)
    assert _same(got["a"], a) and _same(got["b"], b)
    assert got["e"].shape == (0, 5) and got["z"].shape == (0,)


def _tampered(path, change):
    """The checkpoint at path with its header passed through change(header) and its data kept as is, and
    without its checksum, as a program other than distbp would write it: the checks tested are the ones
    that stand behind the checksum."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"][CHECKSUM_KEY]
    change(header)
    out = path.with_name("tampered.safetensors")
    out.write_bytes(_with_header(header, raw[8 + n:]))
    return out


def _flip_bit(raw, where):
    out = bytearray(raw)
    out[where] ^= 0x10
    return bytes(out)


@pytest.mark.parametrize("where", ["weight", "last-byte", "step-in-metadata", "shape-digit"])
def test_a_checkpoint_damaged_on_disk_is_refused_by_its_checksum(good_checkpoint, where):
    # one bit of a weight's float32 changes its value and nothing else: without the checksum the file loads
    raw = good_checkpoint.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if where == "weight":
        damaged = _flip_bit(raw, 8 + n + header["model/0.weight"]["data_offsets"][0] + 2)
    elif where == "last-byte":
        damaged = _flip_bit(raw, len(raw) - 1)
    else:
        text = raw[8:8 + n]
        old, new = ((b'\\"state\\": {\\"step\\": 1', b'\\"state\\": {\\"step\\": 3') if where == "step-in-metadata"
                    else (b'"model/0.weight":{"dtype":"F32","shape":[32,64]',
                          b'"model/0.weight":{"dtype":"F32","shape":[32,66]'))
        assert text.count(old) == 1, text
        damaged = raw[:8] + text.replace(old, new) + raw[8 + n:]
    path = good_checkpoint.with_name("damaged.safetensors")
    path.write_bytes(damaged)
    model, optimizer = make(seed=5)
    before = snapshot(model, optimizer)
    words = "damaged: its contents do not match the checksum" if where != "shape-digit" else "does not fit its shape"
    for load in (lambda: load_checkpoint(path, model, optimizer), lambda: load_weights(path, model)):
        with pytest.raises(CheckpointError, match=words):
            load()
    assert_snapshots_equal(snapshot(model, optimizer), before)
    # the checksum is distbp's own: callers see only their metadata, and cannot store one of that name
    arrays, metadata = load_safetensors(good_checkpoint)
    assert CHECKSUM_KEY not in metadata and "distbp" in metadata
    with pytest.raises(CheckpointError, match=CHECKSUM_KEY):
        save_safetensors(path, arrays, {CHECKSUM_KEY: "1"})


def test_a_file_without_a_checksum_is_read(tmp_path):
    # as other programs write them: the safetensors format has no checksum of its own
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                       "__metadata__": {"note": "hi"}}).encode()
    head += b" " * (-len(head) % 8)
    path = tmp_path / "other.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + values.tobytes())
    arrays, metadata = load_safetensors(path)
    np.testing.assert_array_equal(arrays["w"], values)
    assert metadata == {"note": "hi"}


@pytest.mark.parametrize("how", ["shared-range", "trailing-bytes"])
def test_tampered_checkpoint_is_refused_unchanged(good_checkpoint, how):
    def share(header):  # one array's entry pointed at another's bytes: both would load, one silently wrong
        header["optim/1/exp_avg_sq"]["data_offsets"] = header["optim/1/exp_avg"]["data_offsets"]

    if how == "shared-range":
        path = _tampered(good_checkpoint, share)
        words = "'optim/1/exp_avg(_sq)?' .*overlaps"
    else:
        path = good_checkpoint.with_name("tampered.safetensors")
        path.write_bytes(good_checkpoint.read_bytes() + bytes(64))
        words = "64 trailing bytes"
    model, optimizer = make(seed=5)
    train(model, optimizer, 2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path, model, optimizer)
    assert_snapshots_equal(snapshot(model, optimizer), before)


@pytest.mark.parametrize("header_json", [b"[" * 3000 + b"]" * 3000, b'{"a": ' + b"1" * 5000 + b"}"],
                         ids=["nested-too-deep", "number-of-5000-digits"])
def test_a_header_json_cannot_read_is_refused(tmp_path, header_json):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json)
    with pytest.raises(CheckpointError, match="header is not JSON that can be read"):
        load_safetensors(path)
    deep = json.dumps({"__metadata__": {"distbp": "[" * 3000 + "]" * 3000}}).encode()
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    model, optimizer = make()
    with pytest.raises(CheckpointError, match="not a distbp checkpoint"):
        load_checkpoint(path, model, optimizer)


def _retyped(header):  # one letter: F32 -> I32, the same size; the bits would load as huge integers
    header["model/0.weight"]["dtype"] = "I32"


def _renamed(header):  # one letter of an optimizer array's name: its state would restart from zero silently
    header["xptim/1/exp_avg"] = header.pop("optim/1/exp_avg")


def _bad_signature(header):
    meta = json.loads(header["__metadata__"]["distbp"])
    meta["signature"]["0.bias"] = True
    header["__metadata__"]["distbp"] = json.dumps(meta)


@pytest.mark.parametrize("change, words", [
    (_retyped, r"model/0.weight is int32 \[32, 64\] in the file, but float32"),
    (_renamed, "array 'xptim/1/exp_avg' is neither the model's nor the optimizer's"),
    (_bad_signature, r"the model signature is not \{name: \[shape, dtype\]\}"),
], ids=["dtype", "array-name", "signature"])
def test_a_checkpoint_damaged_in_one_place_is_refused_by_both_loaders(good_checkpoint, change, words):
    path = _tampered(good_checkpoint, change)
    model, optimizer = make(seed=5)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path, model, optimizer)
    with pytest.raises(CheckpointError, match=words):
        load_weights(path, model)
    assert_snapshots_equal(snapshot(model, optimizer), before)


# --- state the optimizer, schedule or counters cannot use -------------------------------------------------


def _rewritten(path, change):
    """The checkpoint at path re-saved (a well-formed file) after change(arrays, meta) edits its contents."""
    arrays, metadata = load_safetensors(path)
    meta = json.loads(metadata["distbp"])
    change(arrays, meta)
    out = path.with_name("edited.safetensors")
    save_safetensors(out, arrays, {"distbp": json.dumps(meta)})
    return out


def _drop_array(key):
    return lambda arrays, meta: arrays.pop(key)


def _set_scalar(idx, key, value):
    return lambda arrays, meta: meta["optimizer"]["scalars"][idx].__setitem__(key, value)


def _set_group(key, value):
    return lambda arrays, meta: meta["optimizer"]["param_groups"][0].__setitem__(key, value)


BAD_OPTIMIZER_STATES = [
    pytest.param(_drop_array("optim/1/exp_avg_sq"), r"parameter 1 lacks \['exp_avg_sq'\]", id="no-exp_avg_sq"),
    pytest.param(_set_scalar("2", "step", -3), "'step' for parameter 2 is -3", id="negative-step"),
    pytest.param(_set_scalar("2", "step", 1.5), "'step' for parameter 2 is 1.5", id="float-step"),
    pytest.param(lambda arrays, meta: arrays.__setitem__("optim/0/exp_avg", np.zeros((32, 64), np.int32)),
                 "'exp_avg' for parameter 0 has dtype int32", id="int-array"),
    pytest.param(lambda arrays, meta: arrays.__setitem__("optim/0/momentum_buffer", np.zeros((32, 64), np.float32)),
                 r"parameter 0 has entries \['momentum_buffer'\] that Adam does not keep", id="foreign-entry"),
    pytest.param(_set_group("lr", -0.5), "learning rate", id="negative-lr"),
    pytest.param(_set_group("eps", "tiny"), "eps", id="string-eps"),
]


@pytest.mark.parametrize("change, words", BAD_OPTIMIZER_STATES)
def test_optimizer_state_that_step_cannot_use_is_refused_unchanged(good_checkpoint, change, words):
    path = _rewritten(good_checkpoint, change)
    model, optimizer = make(seed=6)
    train(model, optimizer, 2)
    before = snapshot(model, optimizer)
    called = []
    with pytest.raises(CheckpointError, match=words) as err:
        load_checkpoint(path, model, optimizer, check_state=called.append)
    assert "edited.safetensors" in str(err.value)
    assert_snapshots_equal(snapshot(model, optimizer), before)
    assert called == []  # refused before the caller's part of the state was looked at
    train(model, optimizer, 1)  # and the optimizer still steps


def test_sgd_checkpoint_without_momentum_buffers_loads(tmp_path):
    # SGD without momentum keeps no buffer: an empty state is not a missing entry
    manual_seed(0)
    model = models.mlp((64,), 10, (32,))
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    train(model, optimizer, 2)
    save_checkpoint(tmp_path / "ck", model, optimizer, {"step": 2})
    manual_seed(1)
    model2 = models.mlp((64,), 10, (32,))
    optimizer2 = optim.SGD(model2.parameters(), lr=0.3)
    assert load_checkpoint(tmp_path / "ck", model2, optimizer2) == {"step": 2}
    assert optimizer2.param_groups[0]["lr"] == 0.1
    assert all(not entries for entries in optimizer2.state.values())
    train(model, optimizer, 1, seed=3)
    train(model2, optimizer2, 1, seed=3)
    for name, value in model.state_dict().items():
        assert _same(model2.state_dict()[name], value), name


def test_check_state_refusal_changes_nothing(good_checkpoint):
    model, optimizer = make(seed=7)
    train(model, optimizer, 2)
    before = snapshot(model, optimizer)

    def refuse(state):
        assert state == {"step": 1}
        raise CheckpointError("not this one")

    with pytest.raises(CheckpointError, match="not this one"):
        load_checkpoint(good_checkpoint, model, optimizer, check_state=refuse)
    assert_snapshots_equal(snapshot(model, optimizer), before)


def _trainer(checkpoint, **overrides):
    from distbp.train import Trainer, make_config

    values = dict(dataset="synthetic", synthetic_size=64, hidden=[8], epochs=2, batch_size=16, optimizer="adam",
                  lr=1e-2, warmup_steps=2, progress="none", checkpoint=str(checkpoint), **overrides)
    return Trainer(make_config(values))


def _trainer_snapshot(trainer):
    return (snapshot(trainer.model, trainer.optimizer), trainer.schedule.state_dict(),
            [g["lr"] for g in trainer.optimizer.param_groups], (trainer.step, trainer.epoch, trainer.batch))


def _edit_state(key, value):
    def change(arrays, meta):
        meta["state"][key] = value
    return change


BAD_RESUME_STATES = [
    pytest.param(_edit_state("world_size", 4), "written by 4 ranks", id="other-world-size"),
    pytest.param(_edit_state("model", "cnn"), "checkpoint of model 'cnn'", id="other-model-name"),
    pytest.param(_edit_state("step", -1), "step is -1", id="negative-step"),
    pytest.param(_edit_state("batch", 2.5), "batch is 2.5", id="float-batch"),
    pytest.param(_edit_state("schedule", {"last_step": 3}), "schedule state", id="schedule-without-base-lrs"),
    pytest.param(_edit_state("schedule", {"last_step": -3, "base_lrs": [0.01]}), "last_step -3",
                 id="negative-schedule-step"),
    pytest.param(_edit_state("schedule", {"last_step": 3, "base_lrs": [0.01, 0.02]}), "base_lrs",
                 id="schedule-of-two-groups"),
    pytest.param(_edit_state("rng", {"bit_generator": "PCG64"}), "generator state", id="rng-state-damaged"),
    pytest.param(_edit_state("vocab", 123), "vocab is 123, not a string", id="vocab-damaged"),
    pytest.param(_drop_array("optim/1/exp_avg_sq"), r"lacks \['exp_avg_sq'\]", id="no-exp_avg_sq"),
]


@pytest.mark.parametrize("change, words", BAD_RESUME_STATES)
def test_resume_from_a_checkpoint_it_cannot_restore_changes_nothing(tmp_path, change, words):
    written = _trainer(tmp_path / "run.ckpt", max_steps=3)
    written.fit()
    path = _rewritten(tmp_path / "run.ckpt", change)
    trainer = _trainer(path)
    for p in trainer.model.parameters():  # weights unlike the checkpoint's, to see that none is loaded
        p.data += 1
    before = _trainer_snapshot(trainer)
    with pytest.raises(CheckpointError, match=words):
        trainer.resume()
    after = _trainer_snapshot(trainer)
    assert_snapshots_equal(after[0], before[0])
    assert after[1:] == before[1:]


def _ps_shard(checkpoint=None):
    from distbp.nn import Parameter
    from distbp.ps.server import Shard

    rng = np.random.default_rng(0)
    params = {"w": Parameter(rng.standard_normal((3, 4)).astype(np.float32)),
              "b": Parameter(rng.standard_normal(4).astype(np.float32))}
    optimizer = optim.Adam(list(params.values()), lr=0.01)
    schedule = optim.StepLR(optimizer, 2, 0.5)
    return Shard(params, optimizer, schedule, mode="async", checkpoint=checkpoint)


def _ps_snapshot(shard):
    state = {name: [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in shard.optimizer.state[p].items()}
                    for p in pieces if p in shard.optimizer.state]
             for name, pieces in shard.pieces.items()}
    return ({n: p.data.copy() for n, p in shard.params.items()}, state, shard.version,
            shard.schedule.state_dict(), [g["lr"] for g in shard.optimizer.param_groups])


def _ps_equal(a, b):
    assert a[0].keys() == b[0].keys() and all(_same(a[0][n], b[0][n]) for n in a[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert len(a[1][name]) == len(b[1][name])
        for sa, sb in zip(a[1][name], b[1][name]):
            assert sa.keys() == sb.keys()
            for k in sa:
                assert _same(sa[k], sb[k]) if isinstance(sa[k], np.ndarray) else sa[k] == sb[k], f"{name}/{k}"
    assert a[2:] == b[2:]


def _ps_steps(shard, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for pieces in shard.pieces.values():
            for piece in pieces:
                piece.grad = Tensor(rng.standard_normal(piece.shape).astype(np.float32))
        shard.optimizer.step()
        shard.schedule.step()
        shard.version += 1
        shard.steps_done[0] = shard.steps_done.get(0, 0) + 1  # as a push of worker 0 counts


BAD_PS_CHECKPOINTS = [
    pytest.param(lambda arrays, meta: arrays.pop("optim/w/exp_avg_sq"), r"'w' lacks \['exp_avg_sq'\]",
                 id="no-exp_avg_sq"),
    pytest.param(lambda arrays, meta: meta["scalars"]["b"].__setitem__("step", -2), "'step' for parameter 'b'",
                 id="negative-step"),
    pytest.param(lambda arrays, meta: arrays.__setitem__("optim/b/exp_avg", np.zeros(4, np.int64)), "dtype int64",
                 id="int-array"),
    pytest.param(lambda arrays, meta: meta.__setitem__("version", 2.5), "version 2.5", id="float-version"),
    pytest.param(lambda arrays, meta: meta.__setitem__("version", -1), "version -1", id="negative-version"),
    pytest.param(lambda arrays, meta: meta.__setitem__("schedule", {"last_step": "2", "base_lrs": [0.01]}),
                 "last_step '2'", id="schedule-damaged"),
    pytest.param(lambda arrays, meta: arrays.__setitem__("param/b", np.zeros(4, np.float64)), "'b'.*dtype",
                 id="float64-parameter"),
]


@pytest.mark.parametrize("change, words", BAD_PS_CHECKPOINTS)
def test_parameter_server_restore_refuses_unchanged(tmp_path, change, words):
    path = tmp_path / "shard.safetensors"
    first = _ps_shard()
    try:
        _ps_steps(first, 3, seed=1)
        first.save(path)
    finally:
        first.stop()
    arrays, metadata = load_safetensors(path)
    meta = json.loads(metadata["distbp-ps"])
    change(arrays, meta)
    save_safetensors(path, arrays, {"distbp-ps": json.dumps(meta)})
    shard = _ps_shard()
    try:
        _ps_steps(shard, 2, seed=2)
        before = _ps_snapshot(shard)
        with pytest.raises(CheckpointError, match=words):
            shard.restore(path)
        _ps_equal(_ps_snapshot(shard), before)
    finally:
        shard.stop()


def test_parameter_server_restore_round_trip(tmp_path):
    path = tmp_path / "shard.safetensors"
    first, again = _ps_shard(), None
    try:
        _ps_steps(first, 3, seed=1)
        first.save(path)
        again = _ps_shard(checkpoint=path)
        _ps_equal(_ps_snapshot(again), _ps_snapshot(first))
    finally:
        first.stop()
        if again is not None:
            again.stop()


# --- atomic writes under SIGKILL -------------------------------------------------------------------------

# The writer loads distbp/serialization.py by file path: the same code, without importing the whole package
# (scipy and all), so that each round starts quickly.
WRITER = r"""
import importlib.util
import sys
import threading
import numpy as np
spec = importlib.util.spec_from_file_location("distbp_checkpoint", sys.argv[3])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
save_safetensors = module.save_safetensors
path, i = sys.argv[1], int(sys.argv[2])
a = np.empty(6_000_000, np.float32)   # 24 MB
b = np.empty(4_000_000, np.float64)   # 32 MB
c = np.empty((1000, 1000), np.int32)  # 4 MB
while True:
    a.fill(i); b.fill(i); c.fill(i)
    save_safetensors(path, {"a": a, "b": b, "c": c}, {"iteration": i})
    print(i, flush=True)
    i += 1
"""


def _check_consistent(path):
    arrays, meta = load_safetensors(path)
    i = int(meta["iteration"])
    assert set(arrays) == {"a", "b", "c"}
    assert arrays["a"].shape == (6_000_000,) and arrays["b"].shape == (4_000_000,) and arrays["c"].shape == (1000, 1000)
    for name, arr in arrays.items():
        assert arr.min() == i and arr.max() == i, f"{name} holds a mix of versions (iteration {i})"
    return i


def test_a_write_removes_temporary_files_of_writers_that_died(tmp_path):
    path = tmp_path / "ck.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.tmp-{int(dead.stdout)}"  # a writer killed mid-write
    stale.write_bytes(b"torn")
    other = tmp_path / ".other.safetensors.tmp-1"  # another file's, and pid 1 is alive
    other.write_bytes(b"x")
    live = tmp_path / f".{path.name}.tmp-1"
    live.write_bytes(b"x")
    save_safetensors(path, {"a": np.ones(3, np.float32)})
    assert not stale.exists() and other.exists() and live.exists()
    np.testing.assert_array_equal(load_safetensors(path)[0]["a"], np.ones(3, np.float32))


def test_threads_saving_one_file_at_once_leave_it_whole(tmp_path):
    # the threads backend runs ranks as threads: they shared one temporary file, and wrote and renamed one
    # another's half-written one (a torn checkpoint, and "the file there is unchanged" errors)
    path = tmp_path / "ck.safetensors"
    errors = []

    def save(k):
        try:
            for _ in range(5):
                save_safetensors(path, {"a": np.full(300_000 + k, k, np.float32), "b": np.full(7, k, np.float32)})
        except Exception as e:  # noqa: BLE001 -- collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    arrays, _ = load_safetensors(path)
    k = int(arrays["b"][0])
    assert arrays["a"].shape == (300_000 + k,) and (arrays["a"] == k).all() and (arrays["b"] == k).all()
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


def test_a_rewritten_file_keeps_its_permissions_and_a_link_keeps_pointing_at_it(tmp_path):
    target = tmp_path / "run3.safetensors"
    save_safetensors(target, {"a": np.zeros(2, np.float32)})
    target.chmod(0o600)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target.name)
    save_safetensors(link, {"a": np.ones(2, np.float32)})
    assert link.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o600
    np.testing.assert_array_equal(load_safetensors(target)[0]["a"], np.ones(2, np.float32))


def test_a_write_removes_temporaries_of_dead_writers_threads(tmp_path):
    path = tmp_path / "ck.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.tmp-{int(dead.stdout)}-12345-{checkpoint_module._HOST}"
    stale.write_bytes(b"torn")
    live = tmp_path / f".{path.name}.tmp-1-1-{checkpoint_module._HOST}"
    live.write_bytes(b"x")
    elsewhere = tmp_path / f".{path.name}.tmp-{int(dead.stdout)}-12345-another-machine"  # its pid says nothing here
    elsewhere.write_bytes(b"being written")
    save_safetensors(path, {"a": np.ones(3, np.float32)})
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_atomic_write_survives_sigkill(tmp_path):
    """SIGKILL a process that rewrites a ~60 MB checkpoint in a loop, at random moments: the file at the path
    must always load and hold one complete version. Odd rounds wait for a write to begin (its temporary file
    to appear) and kill a few milliseconds later, so some kills surely land mid-write."""
    path = tmp_path / "ck.safetensors"
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    latest = None  # the newest iteration found in the file so far
    killed_mid_write = 0
    deadline = time.monotonic() + 25
    for round_ in range(6):
        argv = [sys.executable, "-c", WRITER, str(path), str(round_ * 1000), checkpoint_module.__file__]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tmp = tmp_path / f".{path.name}.tmp-{proc.pid}-{proc.pid}-{checkpoint_module._HOST}"  # (main thread: pid)
        try:
            first = proc.stdout.readline()  # this process's first complete write exists
            assert first.strip(), f"writer failed: {proc.stderr.read() if proc.poll() is not None else ''}"
            if round_ % 2:
                while not tmp.exists() and time.monotonic() < deadline:
                    time.sleep(0.0005)
                time.sleep(float(rng.uniform(0.0, 0.01)))
            else:
                time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        printed = [int(word) for word in (first + proc.stdout.read()).split()]
        proc.stdout.close()
        proc.stderr.close()
        done = max(printed)
        i = _check_consistent(path)
        # the file is the newest complete write, or the one being renamed into place when the kill came
        assert done <= i <= done + 1, f"seed {seed}: file holds iteration {i}, last completed {done}"
        assert latest is None or i > latest
        latest = i
        leftovers = [p.name for p in tmp_path.iterdir() if p != path]
        for name in leftovers:  # torn temporary files exist only under names no one mistakes for the checkpoint
            assert name.startswith(".ck.safetensors.tmp-"), name
        killed_mid_write += tmp.exists()
        assert time.monotonic() < deadline, "the kill test is too slow"
    # some kills did hit writes in progress: the test exercised atomicity, not just the gaps between writes
    assert killed_mid_write >= 1, f"seed {seed}: no kill landed mid-write"


def test_parameters_must_be_finite_and_optimizer_state_may_overflow(tmp_path):
    # Adam's squared gradients overflow first, in a run that goes on soundly (its steps are then 0)
    from distbp.serialization import CheckpointError, check_finite

    state = {"model/w": np.ones(3, np.float32), "optim/0/exp_avg_sq": np.array([np.inf], np.float32)}
    check_finite("ck", state, "model/")
    state["optim/0/exp_avg_sq"][0] = np.nan  # never sound
    with pytest.raises(CheckpointError, match="ck: optim/0/exp_avg_sq holds NaN"):
        check_finite("ck", state, "model/")
    state["optim/0/exp_avg_sq"][0] = np.inf
    state["model/w"][1] = np.inf
    with pytest.raises(CheckpointError, match="ck: model/w holds non-finite values"):
        check_finite("ck", state, "model/")


def test_a_file_of_a_dtype_distbp_does_not_read_says_so(tmp_path):
    # bfloat16, as the safetensors library writes it: it was "a malformed description"
    head = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(4))
    with pytest.raises(CheckpointError, match="entry 'w' has dtype BF16, which distbp does not read .it reads F64, F32"):
        load_safetensors(tmp_path / "bf16.safetensors")


def test_an_array_named_like_the_formats_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'__metadata__': the format reserves the name"):
        save_safetensors(tmp_path / "x.safetensors", {"__metadata__": np.zeros(2, np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_a_file_whose_name_leaves_no_room_for_the_temporarys_suffix_saves(tmp_path):
    # the temporary's name (the file's, plus pid, thread and host) passed 255 bytes: ENAMETOOLONG
    path = tmp_path / ("c" * 240 + ".st")
    save_safetensors(path, {"a": np.ones(2, np.float32)})
    save_safetensors(path, {"a": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(load_safetensors(path)[0]["a"], np.zeros(2, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
