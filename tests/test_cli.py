"""The `distbp` command as a user meets it: help, one-line errors, checkpoints left alone, plots.

Commands run as `python -m distbp ...` subprocesses so that the real stderr and exit status are seen. The
error cases are independent, so they are run once, a few at a time, by a module fixture. Some further cases
(IN_PROCESS) run through `distbp.cli.main` in this process, stderr captured, an escaping exception recorded as
a traceback: the same code path, without paying the package import (scipy and all) once more for each.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

from distbp import cli
from distbp.train.config import FIELDS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(cwd, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "distbp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(cwd, *args):
    """cli.main(args) in cwd, as a CompletedProcess; an exception that escapes main becomes a traceback."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 - what a user would see as a traceback
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["distbp", *args], code, out.getvalue(), err.getvalue())


# --- help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["plot", "--help"]], ids=" ".join)
def test_help_exits_zero(tmp_path, args):
    r = run(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith("usage: distbp")
    flat = re.sub(r"-\s+", "-", " ".join(r.stdout.split()))  # undo line wrapping (argparse breaks at hyphens)
    if args == ["--help"]:
        assert "train" in flat and "plot" in flat
    elif args[0] == "train":
        for f in FIELDS:
            option = "--" + f.name.replace("_", "-")
            assert option in r.stdout, f"train --help does not document {f.name} as {option}"
            assert " ".join(f.help.split()) in flat, f"train --help lacks the help of {f.name}"
        assert "--config" in r.stdout and "--no-resume" in r.stdout
    else:
        assert "METRICS" in r.stdout and "--out" in r.stdout


@pytest.mark.parametrize("args,command", [(["train", "--modle", "cnn"], "train"), (["ps", "serve", "--bogus"], "ps serve"),
                                          (["plot", "m.jsonl", "--bogus"], "plot")])
def test_an_unknown_option_points_to_its_commands_help(tmp_path, args, command):
    # 'distbp --help' lists no train options
    r = run_in_process(tmp_path, *args)
    assert r.returncode == 2
    assert r.stderr == f"distbp: error: unrecognized arguments: {' '.join(args[-2 if args[-1] == 'cnn' else -1:])} " \
                       f"(see 'distbp {command} --help')\n"


def test_every_field_is_an_option():
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {opt for action in train._actions for opt in action.option_strings}
    for f in FIELDS:
        assert "--" + f.name.replace("_", "-") in options


# --- bad input -------------------------------------------------------------------------------------------


# id: (arguments, words the error must contain, a checkpoint file the run must leave unchanged or None)
CASES = {
    "unknown-option": (["train", "--frobnicate", "3"], ["--frobnicate"], None),
    "config-typo": (["train", "--config", "typo.toml"], ["typo.toml", "'lrr'", "did you mean 'lr'"], None),
    "wrong-type-toml": (["train", "--config", "wrongtype.toml"], ["wrongtype.toml", "'epochs'", "integer"], None),
    "wrong-type-option": (["train", "--epochs", "many"], ["--epochs", "many"], None),
    "out-of-range-option": (["train", "--lr", "0"], ["'lr'"], None),
    "malformed-toml": (["train", "--config", "broken.toml"], ["broken.toml", "TOML"], None),
    "missing-config": (["train", "--config", "nope.toml"], ["nope.toml", "does not exist"], None),
    "missing-data-dir": (["train", "--dataset", "idx", "--data-dir", "no-such-dir"], ["no-such-dir"], None),
    "idx-without-data-dir": (["train", "--dataset", "idx"], ["data_dir"], None),
    "bad-idx-file": (["train", "--dataset", "idx", "--data-dir", "badidx"], ["train-images-idx3-ubyte"], None),
    "missing-text-file": (["train", "--model", "charlm", "--text-file", "missing.txt"], ["missing.txt"], None),
    "unknown-model-option": (["train", "--model", "resnet"], ["resnet"], None),
    "unknown-model-toml": (["train", "--config", "resnet.toml"], ["'model'", "resnet"], None),
    "checkpoint-of-other-model": (
        ["train", "--resume", "--hidden", "64", "--checkpoint", "ck-model.safetensors", "--progress", "none"],
        ["ck-model.safetensors", "different model"], "ck-model.safetensors"),
    "corrupt-checkpoint": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-garbage.safetensors", "--progress", "none"],
        ["ck-garbage.safetensors"], "ck-garbage.safetensors"),
    "truncated-checkpoint": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-cut.safetensors", "--progress", "none"],
        ["ck-cut.safetensors"], "ck-cut.safetensors"),
    "checkpoint-of-other-optimizer": (
        ["train", "--resume", "--hidden", "32", "--optimizer", "adam", "--checkpoint", "ck-opt.safetensors",
         "--progress", "none"],
        ["ck-opt.safetensors"], "ck-opt.safetensors"),
    "checkpoint-with-nan": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-nan.safetensors", "--progress", "none"],
        ["ck-nan.safetensors", "model/0.weight holds non-finite values"], "ck-nan.safetensors"),
    "checkpoint-position-damaged": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-pos.safetensors", "--progress", "none"],
        ["ck-pos.safetensors", "batch 99999", "45 steps per epoch"], "ck-pos.safetensors"),
    "checkpoint-step-damaged": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-step.safetensors", "--progress", "none"],
        ["ck-step.safetensors", "step 91, epoch 3, batch 0"], "ck-step.safetensors"),
    "checkpoint-schedule-elsewhere": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-sched.safetensors", "--progress", "none"],
        ["ck-sched.safetensors", "schedule is at step 0, the run at step 90"], "ck-sched.safetensors"),
    "checkpoint-running-loss-damaged": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-run.safetensors", "--progress", "none"],
        ["ck-run.safetensors", "running loss over 1000000 steps at step 90"], "ck-run.safetensors"),
    "checkpoint-data-damaged": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-data.safetensors", "--progress", "none"],
        ["ck-data.safetensors", "damaged checkpoint state: data is 5"], "ck-data.safetensors"),
    "checkpoint-where-no-file-can-be-made": (["train", "--checkpoint", "/proc/run.ckpt", "--progress", "none"],
                                             ["/proc/run.ckpt", "no file can be made in /proc"], None),
    "ps-checkpoint-where-no-file-can-be-made": (["ps", "serve", "--checkpoint-path", "/proc/ps.ckpt"],
                                                ["/proc/ps.ckpt", "no file can be made in /proc"], None),
    "checkpoint-is-a-pipe": (["train", "--checkpoint", "pipe", "--progress", "none"], ["pipe", "not a regular file"],
                             None),
    "resume-from-a-pipe": (["train", "--resume", "--checkpoint", "pipe", "--progress", "none"],
                           ["pipe is not a regular file"], None),
    "init-from-a-pipe": (["train", "--init-from", "pipe", "--progress", "none"], ["pipe is not a regular file"], None),
    "outputs-in-one-file": (["train", "--checkpoint", "out", "--trace", "./out", "--progress", "none"],
                            ["'checkpoint' and 'trace' are the same file"], None),
    "outputs-in-one-file-by-a-link": (["train", "--checkpoint", "real.out", "--metrics", "link.out", "--progress",
                                       "none"], ["'checkpoint' and 'metrics' are the same file"], None),
    "outputs-in-one-file-by-a-hard-link": (["train", "--checkpoint", "hard-a.out", "--trace", "hard-b.out",
                                            "--progress", "none"], ["'checkpoint' and 'trace' are the same file"],
                                           None),
    "threads-rank-refuses-a-checkpoint": (
        ["train", "--backend", "threads", "--world-size", "2", "--resume", "--hidden", "32", "--checkpoint",
         "ck-garbage.safetensors", "--progress", "none"], ["failed: ck-garbage.safetensors"], None),
    "empty-output-path": (["train", "--metrics", "", "--progress", "none"], ["'metrics' is empty"], None),
    "empty-config-name": (["train", "--config", "", "--progress", "none"], ["--config", "name is empty"], None),
    "metrics-over-the-weights-read": (
        ["train", "--hidden", "32", "--init-from", "ck-init.safetensors", "--metrics", "ck-init.safetensors",
         "--progress", "none"], ["'metrics' is 'init_from' (ck-init.safetensors), which the run reads"],
        "ck-init.safetensors"),
    "resume-appending-to-a-binary-file": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "new.ckpt", "--metrics", "ck-bin.safetensors",
         "--progress", "none"], ["metrics file ck-bin.safetensors is not UTF-8 text"], "ck-bin.safetensors"),
    "config-nested-too-deep": (["train", "--config", "deep.toml"], ["config file deep.toml is not valid TOML"], None),
    "config-is-a-device": (["train", "--config", "/dev/zero"], ["config file /dev/zero is not a regular file"], None),
    "text-file-is-a-device": (["train", "--model", "charlm", "--text-file", "/dev/zero", "--progress", "none"],
                              ["text file /dev/zero is not a regular file"], None),
    "idx-of-65-dimensions": (["train", "--dataset", "idx", "--data-dir", "idx65"], ["65 dimensions (at most 64)"],
                             None),
    "plot-a-device": (["plot", "/dev/zero", "-o", "x.png"], ["metrics file /dev/zero is not a regular file"], None),
    "plot-value-not-a-number": (["plot", "badvalue.jsonl", "-o", "x.png"], ["badvalue.jsonl:2: train_loss is {}"],
                                None),
    "plot-json-nested-too-deep": (["plot", "deep.jsonl", "-o", "x.png"],
                                  ["deep.jsonl:1: not a JSON line that can be read"], None),
    "checkpoint-base-rate-damaged": (
        ["train", "--resume", "--hidden", "32", "--checkpoint", "ck-rate.safetensors", "--progress", "none"],
        ["ck-rate.safetensors", "base rates are [1000000.0], this run's [0.1]"], "ck-rate.safetensors"),
    "trace-over-the-config-file": (["train", "--config", "run.toml", "--trace", "run.toml", "--progress", "none"],
                                   ["'trace' is the config file (run.toml)"], "run.toml"),
    "ps-checkpoint-over-the-config-file": (["ps", "serve", "--config", "run.toml", "--checkpoint-path", "run.toml"],
                                           ["--checkpoint-path is the config file (run.toml)"], "run.toml"),
    "ipv6-address-without-brackets": (["train", "--backend", "ps", "--ps", "::1:5000"], ["'::1:5000'", "[::1]:5000"],
                                      None),
    "plot-not-json": (["plot", "notjson.jsonl", "-o", "x.png"], ["notjson.jsonl:2"], None),
    "plot-missing-file": (["plot", "gone.jsonl", "-o", "x.png"], ["gone.jsonl"], None),
    "plot-no-records": (["plot", "empty.jsonl", "-o", "x.png"], ["empty.jsonl"], None),
    "plot-not-an-object": (["plot", "scalar.jsonl", "-o", "x.png"], ["scalar.jsonl"], None),
    "plot-record-without-step": (["plot", "nostep.jsonl", "-o", "x.png"], ["nostep.jsonl"], None),
    "plot-over-its-input": (["plot", "same.png"], ["the output same.png is the metrics file itself"], None),
    "plot-output-under-a-file": (["plot", "metrics.jsonl", "-o", "metrics.jsonl/out.png"],
                                 ["metrics.jsonl is not a directory"], None),
    "plot-output-is-a-directory": (["plot", "metrics.jsonl", "-o", "badidx"], ["badidx is a directory"], None),
    "plot-a-pipe-without-an-output": (["plot", "pipe"], ["pipe is not a regular file", "give -o PNG"], None),
}

# Extra cases, beyond the ones every user hits first, run in-process to keep the suite fast. (Not those that
# could hang: a subprocess has a timeout.)
IN_PROCESS = {"out-of-range-option", "malformed-toml", "missing-config", "idx-without-data-dir", "bad-idx-file",
              "unknown-model-toml", "plot-missing-file", "plot-no-records", "plot-output-under-a-file", "plot-over-its-input",
              "checkpoint-with-nan", "checkpoint-position-damaged", "checkpoint-is-a-pipe", "outputs-in-one-file",
              "empty-output-path", "ipv6-address-without-brackets", "plot-output-is-a-directory",
              "checkpoint-step-damaged", "checkpoint-data-damaged", "outputs-in-one-file-by-a-link", "outputs-in-one-file-by-a-hard-link",
              "threads-rank-refuses-a-checkpoint", "empty-config-name", "metrics-over-the-weights-read",
              "trace-over-the-config-file", "resume-appending-to-a-binary-file",
              "checkpoint-schedule-elsewhere", "checkpoint-running-loss-damaged", "config-nested-too-deep",
              "idx-of-65-dimensions", "plot-value-not-a-number", "plot-json-nested-too-deep",
              "checkpoint-base-rate-damaged"}  # (reading a device once read without end: those run as subprocesses)


def edit_checkpoint(raw, state=None, nan_in=None):
    """The bytes of a checkpoint with its saved state updated from `state` and, if `nan_in` names an array,
    that array's first value NaN; without the checksum distbp writes, as another program would write it (the
    checks behind the checksum are the ones tested)."""
    import struct

    from distbp.serialization import CHECKSUM_KEY

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"][CHECKSUM_KEY]
    data = bytearray(raw[8 + n:])
    if state:
        meta = json.loads(header["__metadata__"]["distbp"])
        meta["state"].update(state)
        header["__metadata__"]["distbp"] = json.dumps(meta)
    if nan_in:
        start = header[nan_in]["data_offsets"][0]
        data[start:start + 4] = struct.pack("<f", float("nan"))
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + bytes(data)



def _params(one_line):
    out = []
    for name in CASES:
        out.append(pytest.param(name, id=name))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real training run: its metrics file and checkpoint (mlp, hidden 32, SGD, 2 epochs)."""
    d = tmp_path_factory.mktemp("trained")
    r = run(d, "train", "--hidden", "32", "--epochs", "2", "--metrics", "metrics.jsonl",
            "--checkpoint", "ck.safetensors", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return d


@pytest.fixture(scope="module")
def results(trained, tmp_path_factory):
    """Every CASES command run once in a directory holding its input files: name -> (result, original bytes)."""
    d = tmp_path_factory.mktemp("cases")
    (d / "typo.toml").write_text("epochs = 1\nlrr = 0.1\n")
    (d / "wrongtype.toml").write_text('epochs = "many"\n')
    (d / "broken.toml").write_text("epochs = = 1\n[x\n")
    (d / "resnet.toml").write_text('model = "resnet"\n')
    (d / "badidx").mkdir()
    (d / "badidx" / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / "badidx" / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    ck = (trained / "ck.safetensors").read_bytes()
    (d / "run.toml").write_text("epochs = 1\n")
    (d / "deep.toml").write_text("hidden = " + "[" * 3000 + "1" + "]" * 3000 + "\n")
    (d / "badvalue.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n{"step": 2, "train_loss": {}}\n')
    (d / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    (d / "idx65").mkdir()
    (d / "idx65" / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 65]) + (1).to_bytes(4, "big") * 65 + b"x")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / "idx65" / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    for name in ("ck-model", "ck-opt", "ck-init", "ck-bin"):
        (d / f"{name}.safetensors").write_bytes(ck)
    (d / "ck-nan.safetensors").write_bytes(edit_checkpoint(ck, nan_in="model/0.weight"))
    (d / "ck-pos.safetensors").write_bytes(edit_checkpoint(ck, state={"batch": 99999}))
    (d / "ck-step.safetensors").write_bytes(edit_checkpoint(ck, state={"step": 91}))  # epoch 2, batch 0
    (d / "ck-data.safetensors").write_bytes(edit_checkpoint(ck, state={"data": 5}))
    schedule_at_0 = {"schedule": {"last_step": 0, "base_lrs": [0.1]}}
    (d / "ck-sched.safetensors").write_bytes(edit_checkpoint(ck, state=schedule_at_0))
    (d / "ck-run.safetensors").write_bytes(edit_checkpoint(ck, state={"running_loss": {"sum": 1.0, "count": 10**6}}))
    (d / "ck-rate.safetensors").write_bytes(edit_checkpoint(ck, state={"schedule": {"last_step": 90,
                                                                                    "base_lrs": [1e6]}}))
    os.mkfifo(d / "pipe")
    (d / "link.out").symlink_to("real.out")
    (d / "hard-a.out").write_text("")
    os.link(d / "hard-a.out", d / "hard-b.out")
    (d / "ck-garbage.safetensors").write_bytes(b"\x13\x37" * 3000)
    (d / "ck-cut.safetensors").write_bytes(ck[: len(ck) * 2 // 3])
    (d / "notjson.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss":\n')
    (d / "empty.jsonl").write_text("")
    (d / "scalar.jsonl").write_text("5\n")
    (d / "nostep.jsonl").write_text('{"train_loss": 1.0}\n')
    shutil.copy(trained / "metrics.jsonl", d / "metrics.jsonl")
    shutil.copy(trained / "metrics.jsonl", d / "same.png")
    originals = {name: (d / ck_name).read_bytes() for name, (_, _, ck_name) in CASES.items() if ck_name}

    def one(name):
        return name, run(d, *CASES[name][0])

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(pool.map(one, [n for n in CASES if n not in IN_PROCESS]))
    for name in IN_PROCESS:
        done[name] = run_in_process(d, *CASES[name][0])
    return {name: (done[name], originals.get(name), d) for name in CASES}


@pytest.mark.parametrize("name", _params(one_line=False))
def test_bad_input_fails_cleanly(results, name):
    """Non-zero exit, no traceback, and a last line that is the error naming what is wrong."""
    r, _, _ = results[name]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "error:" in last
    for word in CASES[name][1]:
        assert word in last, f"{word!r} not in {last!r}"


@pytest.mark.parametrize("name", _params(one_line=True))
def test_bad_input_is_one_error_line(results, name):
    r, _, _ = results[name]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n" + r.stderr[-2000:]
    assert lines[0].startswith("distbp: error: ")


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_refused_checkpoint_is_left_unchanged(results, name):
    r, original, d = results[name]
    assert r.returncode != 0
    assert (d / CASES[name][2]).read_bytes() == original
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert not leftovers


def test_trained_checkpoint_resumes(trained, tmp_path):
    """The other side of the refusals: the same checkpoint with the same model resumes and trains on."""
    shutil.copy(trained / "ck.safetensors", tmp_path / "ck.safetensors")
    before = (tmp_path / "ck.safetensors").read_bytes()
    r = run(tmp_path, "train", "--resume", "--hidden", "32", "--epochs", "3", "--checkpoint", "ck.safetensors",
            "--progress", "plain", "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    assert "resumed from ck.safetensors at step 90 (the end of epoch 2)" in r.stdout  # 2 epochs of 45 steps
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [135]
    assert (tmp_path / "ck.safetensors").read_bytes() != before


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_the_last_one(trained, tmp_path):
    # a full disk, a file-size limit: the message names the file, and the checkpoint there stays whole
    import resource

    shutil.copy(trained / "ck.safetensors", tmp_path / "ck.safetensors")
    before = (tmp_path / "ck.safetensors").read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-m", "distbp", "train", "--resume", "--hidden", "32", "--epochs", "3",
                        "--checkpoint", "ck.safetensors", "--progress", "none"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, preexec_fn=small_files)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("distbp: error: ck.safetensors: cannot write it (File too large); "
                                                 "the file there is unchanged")
    assert (tmp_path / "ck.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


@pytest.mark.parametrize("sent,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("ranks", [[], ["--backend", "threads", "--world-size", "2"]], ids=["local", "threads"])
def test_ctrl_c_or_sigterm_stops_training_at_once_with_one_line(tmp_path, signal_when_training, sent, code, word,
                                                                ranks):
    # SIGTERM is how schedulers end a job; in the threads backend the rank threads, which the signal does
    # not reach, used to train on to the end
    command = [sys.executable, "-m", "distbp", "train", "--dataset", "synthetic", "--synthetic-size", "20000",
               "--epochs", "50", "--progress", "plain", "--log-every", "1", "--checkpoint", "c.ckpt",
               "--checkpoint-every", "2", *ranks]
    returncode, err = signal_when_training(command, sent, cwd=tmp_path)
    assert returncode == code, err
    assert err.strip().splitlines() == [f"distbp: {word}"]
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["c.ckpt"])  # no half-written checkpoint left


@pytest.mark.parametrize("sent,caught", [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_stop_signal_that_python_drops_inside_a_callback_is_sent_again(sent, caught):
    # a handler's exception raised inside a weakref callback (one runs in every import) is printed and dropped:
    # a worker signalled during an import ran on, waiting for its servers
    code = f"""
import os, signal, sys, time, weakref
from distbp.train.launch import Terminated, stop_on_sigterm
stop_on_sigterm()
class Thing:
    pass
def callback(ref):
    os.kill(os.getpid(), {int(sent)})
    for _ in range(100000):  # the handler runs in here, and its exception is dropped
        pass
thing = Thing()
ref = weakref.ref(thing, callback)
try:
    del thing
    print("ran on", flush=True)
    time.sleep(30)
except {caught}:
    print("stopped", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["ran", "on", "stopped"], (r.stdout, r.stderr[-2000:])
    assert r.stderr == ""  # the dropped one is not reported: it is not lost


def test_other_exceptions_python_drops_are_still_reported():
    code = """
import weakref
from distbp.train.launch import stop_on_sigterm
stop_on_sigterm()
class Thing:
    pass
def callback(ref):
    raise ValueError("lost in a callback")
thing = Thing()
ref = weakref.ref(thing, callback)
del thing
print("ran on")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ran on\n"
    assert "Exception ignored" in r.stderr and "ValueError: lost in a callback" in r.stderr


def test_an_empty_option_clears_what_the_config_file_sets(tmp_path):
    # without a value in the file, "" is refused (an unset shell variable would lose the output silently)
    (tmp_path / "run.toml").write_text('checkpoint = "run.ckpt"\nps = "127.0.0.1:1"\n')
    r = run_in_process(tmp_path, "train", "--config", "run.toml", "--checkpoint", "", "--ps", "", "--max-steps", "2",
                       "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run.ckpt").exists()


_HEAP_CHURN = """
import resource, sys
import numpy as np
from distbp.train.launch import keep_freed_memory
print(keep_freed_memory())
def step():  # what a training step does: large temporaries allocated and freed again
    kept = [np.ones(2 << 20, np.float32) for _ in range(3)]
    del kept
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_processes_keep_freed_memory_instead_of_faulting_in_fresh_pages():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", _HEAP_CHURN], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    said, faults = r.stdout.splitlines()
    assert said.startswith("malloc keeps freed blocks")
    assert float(faults) < 50  # glibc's default here: about 1,000 page faults per step (24 MB of fresh pages)
    # a user who tunes malloc keeps their settings: nothing is changed
    for variable, value in (("MALLOC_TRIM_THRESHOLD_", "1000000"), ("MALLOC_ARENA_MAX", "2"),
                            ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")):
        r = subprocess.run([sys.executable, "-c", _HEAP_CHURN], capture_output=True, text=True, timeout=60,
                           env={**env, variable: value})
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "None", (variable, r.stderr)


def test_the_heap_is_left_alone_off_linux(monkeypatch):
    from distbp.train import launch

    monkeypatch.setattr(sys, "platform", "win32")  # ctypes.CDLL(None) raises TypeError there
    assert launch.keep_freed_memory() is None


@pytest.mark.parametrize("args", [["train", "--max-steps", "1", "--progress", "none"],
                                  ["ps", "serve", "--port", "-1"]], ids=lambda a: a[0])
def test_train_and_ps_serve_set_the_heap_up_at_start(tmp_path, monkeypatch, args):
    from distbp.train import launch

    calls = []
    monkeypatch.setattr(launch, "keep_freed_memory", lambda: calls.append(1))
    run_in_process(tmp_path, *args)  # the server refuses its port after the set-up: what it did is enough
    assert calls == [1]


def test_out_of_memory_is_one_line():
    assert cli.error_message(MemoryError("Unable to allocate 23.8 GiB")).startswith(
        "out of memory: Unable to allocate 23.8 GiB")


# --- plot ----------------------------------------------------------------------------------------------


def test_metrics_file_of_training(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [45, 90]  # 1,438 training digits in batches of 32
    for rec in records:
        assert {"train_loss", "test_loss", "test_accuracy", "lr"} <= set(rec)
        assert 0.0 <= rec["test_accuracy"] <= 1.0
    assert records[-1]["test_accuracy"] > 0.8  # an MLP learns the digits in two epochs


def test_plot_writes_png(trained, tmp_path):
    out = tmp_path / "out.png"
    r = run(tmp_path, "plot", str(trained / "metrics.jsonl"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 400)  # figsize (10, 4) at 100 dpi


def test_plot_default_output_name(trained, tmp_path, capsys):
    shutil.copy(trained / "metrics.jsonl", tmp_path / "run.jsonl")
    assert cli.main(["plot", str(tmp_path / "run.jsonl")]) == 0
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert str(png) in capsys.readouterr().out


def test_plot_makes_the_directories_of_its_output_as_training_does_for_its_outputs(trained, tmp_path):
    assert cli.main(["plot", str(trained / "metrics.jsonl"), "-o", str(tmp_path / "new" / "dir" / "c.png")]) == 0
    assert (tmp_path / "new" / "dir" / "c.png").read_bytes()[:8] == PNG_SIGNATURE  # it refused: no such directory


def test_plot_names_the_file_it_writes_without_a_suffix(trained, tmp_path, capsys):
    assert cli.main(["plot", str(trained / "metrics.jsonl"), "-o", str(tmp_path / "curves")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["plot", "config"])
def test_a_directory_or_binary_file_where_a_file_is_expected_is_one_line(tmp_path, capsys, command):
    (tmp_path / "bin").write_bytes(b"\xd0\xff\x00garbage")
    for target in (tmp_path, tmp_path / "bin"):
        argv = ["plot", str(target)] if command == "plot" else ["train", "--config", str(target)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("distbp: error:") and str(target) in err and "Traceback" not in err


@pytest.mark.parametrize("backend", [["--backend", "local"], ["--backend", "threads", "--world-size", "2"]],
                         ids=["local", "threads"])
def test_output_piped_to_a_reader_that_stops_ends_quietly(backend):
    # `distbp train | head -1`: it used to say "distbp: error: Broken pipe" and exit 2
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *backend, "--progress", "plain", "--log-every",
                             "1", "--epochs", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("training mlp")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == "", err


def test_a_config_given_through_a_pipe_is_read(tmp_path):
    # process substitution: the shell's pipe has a writer; a device (/dev/zero) is refused (above)
    command = f"{sys.executable} -m distbp train --config <(printf 'max_steps = 2\\nhidden = [16]\\n') " \
              "--progress plain"
    r = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "done: 2 steps" in r.stdout, r.stderr


def test_a_toml_error_names_its_line_whatever_the_length_of_the_message(tmp_path):
    long_key = "settings_for_the_second_experiment_of_the_week_on_the_cluster"
    (tmp_path / "dup.toml").write_text(f"[{long_key}]\nepochs = 1\n[{long_key}]\nepochs = 2\n")
    r = run_in_process(tmp_path, "train", "--config", "dup.toml")
    assert r.returncode == 2 and "at line 3" in r.stderr, r.stderr
