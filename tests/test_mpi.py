"""Real MPI ranks started with mpiexec from the test suite: equivalence with one process, and failures."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distbp.comm import find_mpiexec
from distbp.train import Trainer, make_config
from distbp.train.checkpoint import load_safetensors

MPIEXEC = find_mpiexec()
if MPIEXEC is None:  # a declared dependency: its absence is a broken install, not a reason to skip
    pytest.fail("no mpiexec beside this Python or on PATH: pip install -e '.[test]' installs the mpich wheel's",
                pytrace=False)
HERE = Path(__file__).parent


def mpiexec(n, *args, timeout=90):
    """Run `python -m distbp ARGS` (or a script) on n ranks; returns (exit code, stdout, stderr, seconds)."""
    command = [MPIEXEC, "-n", str(n), sys.executable, *args]
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


@pytest.fixture(autouse=True)
def no_topology_file_left():
    """MPICH's mpiexec leaves its topology file in /tmp when a job ends in MPI_Abort, as many here do."""
    pattern = "/tmp/hydra_hwloc_xmlfile_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):
            os.unlink(path)


def mpich_names():
    return {f for f in os.listdir("/dev/shm") if f.startswith("mpich_shm_")} if os.path.isdir("/dev/shm") else set()


def left_behind(before, wait=10.0):
    """MPICH shared-memory files made since `before` (mpich_names()) that no live process maps: leaked. A
    rank of the job may still be exiting when mpiexec returns: its files are looked at again until it is
    gone; one still mapped after `wait` seconds belongs to another job running now."""
    deadline = time.monotonic() + wait
    while True:
        new = mpich_names() - before
        mapped = set()
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                text = maps.read_bytes()
            except OSError:  # the process ended, or is not ours
                continue
            mapped |= {name for name in new if name.encode() in text}
        if not mapped or time.monotonic() > deadline:
            return sorted(new - mapped)
        time.sleep(0.1)


COMMON = ["--dataset", "synthetic", "--synthetic-size", "2000", "--hidden", "32", "--epochs", "2"]


@pytest.mark.parametrize("optimizer,lr,cap,shm", [
    ("sgd", "0.05", "25", "1"), ("adam", "0.001", "25", "1"),
    ("sgd", "0.05", "0.000001", "1"),  # one bucket per parameter
    ("sgd", "0.05", "25", "0"),  # MPI's own all-reduce instead of shared memory
])
def test_two_mpi_ranks_train_like_one_process_on_the_global_batch(tmp_path, optimizer, lr, cap, shm, monkeypatch):
    monkeypatch.setenv("DISTBP_MPI_SHM", shm)
    ckpt = tmp_path / "mpi.ckpt"
    code, out, err, _ = mpiexec(2, "-m", "distbp", "train", "--backend", "mpi", *COMMON, "--optimizer", optimizer,
                                "--lr", lr, "--batch-size", "16", "--checkpoint", str(ckpt), "--progress", "none",
                                "--bucket-cap-mb", cap)
    assert code == 0, err
    single = Trainer(make_config({"dataset": "synthetic", "synthetic_size": 2000, "hidden": [32], "epochs": 2,
                                  "optimizer": optimizer, "lr": float(lr), "batch_size": 32, "progress": "none"}))
    single.fit()
    arrays, _ = load_safetensors(ckpt)
    for name, p in single.model.named_parameters():
        np.testing.assert_allclose(arrays[f"model/{name}"], p.data, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("ranks,shm", [(2, "1"), (3, "1"), (2, "0")], ids=["2-shm", "3-shm", "2-mpi"])
def test_allreduce_in_shared_memory_and_through_mpi(ranks, shm, monkeypatch):
    """Buffers from comm.buffer() are reduced in shared memory (unless DISTBP_MPI_SHM=0), others by MPI."""
    monkeypatch.setenv("DISTBP_MPI_SHM", shm)
    code, out, err, _ = mpiexec(ranks, str(HERE / "mpi_collectives.py"))
    assert code == 0, err
    shared = shm == "1"
    assert f"shared_memory={shared} buffers_shared={5 if shared else 0} segments_left=0 ok" in out, out


@pytest.mark.parametrize("ranks,shm", [(2, "1"), (3, "0")], ids=["2-shm", "3-mpi"])
def test_dataparallel_keeps_its_collectives_apart_and_closes_after_a_failure(ranks, shm, monkeypatch):
    # a loss all-reduced between backward and synchronize() paired with a bucket that some ranks start only in
    # synchronize() (allow_unused): wrong on every path but shared memory. And a wrapper that failed could
    # not close with its shared buckets in flight, so the model could not be wrapped again
    monkeypatch.setenv("DISTBP_MPI_SHM", shm)
    before = mpich_names()
    code, out, err, _ = mpiexec(ranks, str(HERE / "mpi_collectives.py"), "dataparallel", timeout=120)
    assert code == 0, err[-3000:]
    assert "dataparallel ok" in out, out
    assert not left_behind(before)


def test_a_rank_late_to_build_its_dataparallel_is_named_within_the_timeout():
    code, out, err, seconds = mpiexec(2, str(HERE / "mpi_collectives.py"), "late-dataparallel", timeout=60)
    assert "rank 0 timed out" in out and "rank(s) [1] did not arrive" in out, out + err
    assert "rank 0 timed out" in out.split("rank 1")[0], out  # rank 0 before rank 1 woke


@pytest.mark.parametrize("failure,message", [("fail-create", "No space left on device"),
                                             ("fail-map", "Cannot allocate memory")])
def test_a_shared_buffer_that_cannot_be_made_falls_back_to_mpi_on_every_rank(failure, message):
    code, out, err, _ = mpiexec(3, str(HERE / "mpi_collectives.py"), failure)
    assert code == 0, err
    assert "fallback: /dev/shm/distbp-" in out and message in out, out
    assert "shared_memory=True buffers_shared=0 segments_left=0 ok" in out, out


def test_shared_buffers_of_different_sizes_are_refused_on_every_rank():
    code, out, err, _ = mpiexec(2, str(HERE / "mpi_collectives.py"), "sizes-differ")
    assert code == 0, err
    for rank in (0, 1):
        assert f"rank {rank} refused: buffer: the ranks asked for different sizes (bytes per rank: [4000, 8000])" in out
    _assert_no_segments_left(out)


def test_a_process_may_make_many_communicators_that_reduce_float16():
    code, out, err, _ = mpiexec(2, str(HERE / "mpi_collectives.py"), "many-communicators", timeout=120)
    assert code == 0 and "1100 communicators ok" in out, out + err


def test_a_rank_late_for_a_shared_buffer_times_out_and_leaves_no_file_behind():
    code, out, err, _ = mpiexec(2, str(HERE / "mpi_collectives.py"), "late")
    assert "rank 0 timed out: rank 0: allgather" in out and "rank(s) [1] did not arrive" in out, out + err
    _assert_no_segments_left(out)


def test_a_shared_buffer_reduced_against_a_plain_array_times_out_naming_the_mismatch():
    code, out, err, seconds = mpiexec(2, str(HERE / "mpi_collectives.py"), "mixed", timeout=60)
    for rank in (0, 1):
        assert f"rank {rank} timed out: rank {rank}: allreduce" in out, out + err
    assert out.count("though every rank has waited in it as long: the ranks called it with arguments that do not "
                     "match") == 2
    _assert_no_segments_left(out)


def test_a_rank_that_reaches_a_collective_after_the_timeout_is_named_late_not_mismatched():
    code, out, err, seconds = mpiexec(2, str(HERE / "mpi_collectives.py"), "late-allreduce", timeout=60)
    assert "rank 0 timed out: rank 0: allreduce (collective #7) did not complete within 2 s; rank(s) [1] reached " \
           "it only after that" in out, out + err


@pytest.mark.parametrize("case,words", [
    ("size", "rank 1 calls allreduce of 9 float32 op sum but rank 0 allreduce of 8 float32 op sum"),
    ("dtype", "rank 1 calls allreduce of 8 float64"),
    ("op", "rank 1 calls allreduce of 8 float32 op mean"),
    ("kind", "rank 1 calls barrier but rank 0 allreduce"),
    ("root", "rank 1 calls broadcast of 8 float32 root 1 but rank 0 broadcast of 8 float32 root 0"),
    ("shared", "a comm.buffer()"),
])
def test_checked_collectives_name_a_mismatched_call_on_every_rank(case, words):
    # without the check MPI gives garbage (another size or dtype), or a rank returns from a barrier with
    # the other's all-reduce unfinished
    code, out, err, seconds = mpiexec(2, str(HERE / "mpi_collectives.py"), f"checked-{case}", timeout=60)
    assert code == 0, err
    for rank in (0, 1):
        assert f"rank {rank} refused: collective #" in out and words in out, out + err


def _assert_no_segments_left(out):
    creator = out.split("creator ", 1)[1].split()[0]
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"distbp-{creator}-")]
    assert not left, left


def test_shared_buffers_past_the_limit_are_reduced_by_mpi():
    code, out, err, _ = mpiexec(2, str(HERE / "mpi_collectives.py"), "limit-3")
    assert code == 0, err
    assert "shared_memory=True buffers_shared=3 segments_left=0 ok" in out, out


def test_mpi_is_detected_and_only_rank_zero_reports():
    code, out, err, _ = mpiexec(2, "-m", "distbp", "train", "--epochs", "1", "--progress", "plain")
    assert code == 0, err
    assert out.count("training mlp") == 1  # one header, from rank 0
    assert "23 steps per epoch" in out  # 1,438 digits over 2 ranks of 32
    assert "test accuracy" in out


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_promptly(kind):
    before = mpich_names()
    code, out, err, seconds = mpiexec(2, str(HERE / "mpi_faults.py"), kind, timeout=60)
    assert code != 0
    assert seconds < 30
    if kind == "raise":  # a bug: its traceback, and status 1
        assert "rank 1 of 2 failed" in err and "injected failure on rank 1" in err
        assert code == 1 and "Traceback" in err, err
    assert not left_behind(before)  # MPICH removes its segment only in MPI_Finalize, which never came


def test_bad_input_found_by_every_rank_exits_2_in_one_line_per_rank_as_on_one_process(tmp_path):
    code, _, err, _ = mpiexec(2, "-m", "distbp", "train", "--backend", "mpi", "--dataset", "idx", "--data-dir",
                              str(tmp_path), timeout=60)
    assert code == 2, err  # was 1
    assert err.count("no train-images-idx3-ubyte") == 2 and "Traceback" not in err, err


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_collective_timeout_names_the_missing_rank(ranks):
    # with 3 ranks, rank 2 waits in the collective too and answers when asked: only rank 1 is named
    before = mpich_names()
    code, out, err, seconds = mpiexec(ranks, str(HERE / "mpi_faults.py"), "hang", timeout=60)
    assert code != 0 and seconds < 30
    assert "did not complete within 3 s" in err and "rank(s) [1] did not arrive" in err, err
    assert not left_behind(before)


@pytest.mark.parametrize("first, second, said", [
    (["--lr", "0.1"], ["--lr", "0.2"], "lr = 0.2 but rank 0 with 0.1"),
    # another model or data set size gives other data too: the setting is named, not the data
    (["--model", "cnn"], [], "model = 'mlp' but rank 0 with 'cnn'"),
    (["--dataset", "synthetic", "--synthetic-size", "1000"], ["--dataset", "synthetic", "--synthetic-size", "1200"],
     "synthetic_size = 1200 but rank 0 with 1000"),
], ids=["lr", "model", "data-size"])
def test_ranks_started_with_different_configs_stop_at_start_up(first, second, said):
    base = [sys.executable, "-m", "distbp", "train", "--backend", "mpi", "--epochs", "1", "--progress", "none"]
    command = [MPIEXEC, "-n", "1", *base, *first, ":", "-n", "1", *base, *second]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert said in done.stderr and "every rank must run the same configuration" in done.stderr, done.stderr


def _mpmd(first, second, timeout=60, cwd=None):
    """Two ranks of one job started with their own arguments: (exit code, stderr, seconds)."""
    base = [sys.executable, "-m", "distbp", "train", "--backend", "mpi", "--progress", "none", "--timeout", "20"]
    command = [MPIEXEC, "-n", "1", *first[:-1], *base, *first[-1], ":", "-n", "1", *second[:-1], *base, *second[-1]]
    start = time.monotonic()
    # this checkout's distbp, also for ranks that -wdir puts elsewhere (they imported the installed one)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return done.returncode, done.stderr, time.monotonic() - start


def test_a_rank_refusing_its_options_ends_the_job_at_once():
    # it fails before MPI starts, and its peer would otherwise wait in MPI's start-up for ever
    before = mpich_names()
    code, err, seconds = _mpmd([["--epochs", "1"]], [["--epochs", "1", "--hidden", "-3"]])
    assert code != 0 and seconds < 15, err
    assert "distbp: error: rank 1 of 2: options: 'hidden' must be >= 1" in err
    assert not left_behind(before)


def test_a_failing_process_of_another_backend_under_mpiexec_exits_without_waiting_for_mpi():
    # parameter-server workers started by mpiexec never start MPI: the failing one must not join MPI's
    # start-up to end the job, and wait there for peers that never come
    command = [MPIEXEC, "-n", "1", sys.executable, "-m", "distbp", "train", "--backend", "ps", "--ps", "127.0.0.1:1",
               "--text-file", "/nonexistent.txt", "--model", "charlm", ":",
               "-n", "1", sys.executable, "-c", "import time; time.sleep(3)"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - start < 20, done.stderr
    assert "does not exist" in done.stderr


def test_checked_collectives_asked_for_on_one_rank_are_checked_on_all():
    # the one rank's check paired with its peers' real collectives: garbage, an IndexError, and the peers
    # waited for the whole timeout
    code, err, seconds = _mpmd([["--epochs", "1"]], ["env", "DISTBP_CHECK_COLLECTIVES=1", ["--epochs", "1"]])
    assert code == 0 and seconds < 30, err


FAIL_IN_THE_COMMUNICATOR = """
import os, sys
import distbp.comm.mpi as mpi
made = mpi.MPICommunicator.__init__
def failing(self, *args, **kwargs):
    if self_rank() == 1:
        raise RuntimeError("no communicator for rank 1")
    made(self, *args, **kwargs)
def self_rank():
    return mpi._mpi().COMM_WORLD.Get_rank()
mpi.MPICommunicator.__init__ = failing
from distbp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_failing_to_make_its_communicator_ends_the_job_at_once():
    # its peers wait in the communicator's own collectives: they waited for the whole timeout, then MPI's end
    code, _, err, seconds = mpiexec(2, "-c", FAIL_IN_THE_COMMUNICATOR, "train", "--backend", "mpi", "--timeout",
                                    "60", "--epochs", "1", "--progress", "none")
    assert code != 0 and seconds < 30, err
    assert "distbp: rank 1 of 2 failed: RuntimeError: no communicator for rank 1" in err


@pytest.mark.parametrize("other", ["reversed", "longer"])
def test_ranks_whose_copies_of_the_data_differ_are_refused_at_start_up(tmp_path, other):
    # one path, two machines' disks: the same characters in another order trained on without a word (or
    # more text: the numbers of examples differ too, and the message still names the data)
    text = "".join(chr(97 + i % 26) for i in range(6000))
    for name, content in (("a", text), ("b", text[::-1] if other == "reversed" else text * 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.txt").write_text(content)
    args = ["--model", "charlm", "--text-file", "corpus.txt", "--max-steps", "2"]
    code, err, seconds = _mpmd(["-wdir", str(tmp_path / "a"), args], ["-wdir", str(tmp_path / "b"), args])
    assert code != 0 and seconds < 30, err
    assert "rank 1 trains on other data than rank 0 (fingerprints" in err
    assert "every machine's copy of the data set must be the same" in err


ON_ANOTHER_MACHINE = """
import socket, sys, time
from mpi4py import MPI
if MPI.COMM_WORLD.Get_rank() == 1:  # a machine of its own, booted 1000 s later than rank 0's
    clock = time.perf_counter
    time.perf_counter = lambda: clock() - 1000.0
    socket.gethostname = lambda: "another-machine"
from distbp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_trace_of_ranks_on_two_machines_has_one_time_origin(tmp_path):
    # each machine's perf_counter counts from its own boot: rank 0's reading put the other machine's spans
    # 1000 s before the first
    path = tmp_path / "t.json"
    code, _, err, _ = mpiexec(2, "-c", ON_ANOTHER_MACHINE, "train", "--backend", "mpi", *COMMON, "--max-steps", "5",
                              "--progress", "none", "--trace", str(path))
    assert code == 0, err
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    firsts = [min(e["ts"] for e in spans if e["pid"] == rank) for rank in (0, 1)]
    assert all(0 <= first < 10_000_000 for first in firsts), firsts  # microseconds
    assert abs(firsts[0] - firsts[1]) < 1_000_000


def test_tracing_on_one_rank_only_is_refused_at_start_up(tmp_path):
    code, err, seconds = _mpmd([["--epochs", "1", "--trace", str(tmp_path / "t.json")]], [["--epochs", "1"]])
    assert code != 0 and seconds < 15, err
    assert "tracing = False but rank 0 with True" in err


def test_ranks_resuming_from_different_checkpoints_are_refused(tmp_path):
    # the same relative path names a checkpoint at step 5 for rank 0 and nothing for rank 1 (node-local disks)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, _, err, _ = mpiexec(2, "-m", "distbp", "train", *COMMON, "--batch-size", "16", "--max-steps", "5",
                              "--checkpoint", str(tmp_path / "a" / "run.ckpt"))
    assert code == 0, err
    args = [*COMMON, "--batch-size", "16", "--checkpoint", "run.ckpt", "--resume"]
    code, err, seconds = _mpmd(["-wdir", str(tmp_path / "a"), args], ["-wdir", str(tmp_path / "b"), args])
    assert code != 0 and seconds < 30, err
    assert "rank 1 starts at step 0 but rank 0 at step 5" in err


def test_ranks_resuming_from_checkpoints_of_two_runs_at_one_step_are_refused(tmp_path):
    # node-local copies of two runs, both at step 5: rank 0's parameters were broadcast, but each rank kept
    # its own optimizer state and schedule, and the job trained on to a wrong result
    for run, epochs in (("a", "2"), ("b", "3")):  # the schedules differ, so do the parameters at step 5
        (tmp_path / run).mkdir()
        code, _, err, _ = mpiexec(2, "-m", "distbp", "train", *COMMON, "--batch-size", "16", "--max-steps", "5",
                                  "--epochs", epochs, "--checkpoint", str(tmp_path / run / "run.ckpt"))
        assert code == 0, err
    args = [*COMMON, "--batch-size", "16", "--epochs", "2", "--checkpoint", "run.ckpt", "--resume"]
    code, err, seconds = _mpmd(["-wdir", str(tmp_path / "a"), args], ["-wdir", str(tmp_path / "b"), args])
    assert code != 0 and seconds < 30, err
    assert "rank 1 resumed from a checkpoint whose contents differ from rank 0's (both at step 5)" in err
    code, err, _ = _mpmd(["-wdir", str(tmp_path / "a"), args], ["-wdir", str(tmp_path / "a"), args])
    assert code == 0, err  # the same file (or an identical copy) resumes


@pytest.mark.parametrize("sent,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_ends_every_rank_quietly(signal_when_training, sent, code, word):
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "distbp", "train", "--dataset", "synthetic",
               "--synthetic-size", "20000", "--epochs", "50", "--progress", "plain", "--log-every", "1"]
    returncode, err = signal_when_training(command, sent)
    assert returncode == code, err
    assert f"rank 0 of 2 {word}" in err and "Traceback" not in err


@pytest.mark.parametrize("launcher", [{"OMPI_COMM_WORLD_SIZE": "2"}, {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}])
def test_a_launcher_that_mpi_does_not_understand_is_refused(launcher):
    # another MPI's mpirun, or srun without a PMI this MPI speaks: each process would start MPI alone and
    # train on all the data, every one of them writing the same checkpoint
    env = {**os.environ, **launcher}
    done = subprocess.run([sys.executable, "-m", "distbp", "train", "--backend", "mpi", "--epochs", "1",
                           "--progress", "none"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    key = next(k for k in launcher if k != "SLURM_STEP_ID")
    assert f"{key}={launcher[key]}: the launcher started this process as one of" in done.stderr, done.stderr


@pytest.mark.parametrize("backend", ["local", "threads"])
def test_a_backend_of_one_process_started_as_several_ranks_is_refused(backend):
    # `mpiexec -n 2 distbp train --backend local`: two runs, each on all the data, writing the same files
    code, out, err, _ = mpiexec(2, "-m", "distbp", "train", "--backend", backend, "--epochs", "1",
                                "--progress", "none", timeout=60)
    assert code != 0
    assert f"backend {backend} in one of 2 processes started by an MPI launcher (PMI_SIZE=2)" in err, err
    assert "step" not in out, out


@pytest.mark.parametrize("ranks", ["abc", "0", "-2", "2.5", "--epochs", None])
def test_the_launch_script_refuses_a_rank_count_that_is_not_a_positive_integer(ranks):
    # mpiexec itself would run "abc" or "0" as one rank and "2.5" as two
    script = HERE.parent / "launch" / "mpirun.sh"
    args = [] if ranks is None else [ranks, "--epochs", "1"]
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"RANKS must be a positive integer, not '{ranks or ''}'" in done.stderr


def test_the_launch_script_refuses_a_rank_count_past_mpiexecs_integer():
    # mpiexec -n 4294967298 ran 2 ranks
    script = HERE.parent / "launch" / "mpirun.sh"
    done = subprocess.run(["bash", str(script), "99999999999999999999", "--epochs", "1"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "RANKS must be at most 999999, not '99999999999999999999'" in done.stderr


@pytest.mark.parametrize("env, said", [
    ({"HOSTFILE": "/nonexistent"}, "HOSTFILE '/nonexistent' is not a readable file"),
    ({"PYTHON": "/nonexistent/python"}, "PYTHON '/nonexistent/python' is not a command here"),
], ids=["hostfile", "python"])
def test_the_launch_script_names_a_missing_file_in_one_line(env, said):
    # mpiexec said so in lines of its own internals (7 of them for a hostfile), once per rank for the python
    script = HERE.parent / "launch" / "mpirun.sh"
    done = subprocess.run(["bash", str(script), "2", "--epochs", "1"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})
    assert done.returncode == 2 and said in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_the_one_machine_launch_script_trains_with_the_mpiexec_beside_its_python(tmp_path):
    # a virtual environment's python named by PYTHON, its bin directory not on PATH: its own mpiexec is used
    # (a stand-in venv over this Python and its site-packages, its mpiexec the one the tests use)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\ninclude-system-site-packages = true\n")
    (venv / "bin" / "python").symlink_to(sys.executable)
    wheel_bin = next((d for d in (Path(sys.executable).parent, Path(MPIEXEC).resolve().parent)
                      if (d / "mpiexec").is_file() and (d / "hydra_pmi_proxy").is_file()), None)
    if wheel_bin is None:
        pytest.skip("this MPI is not the mpich wheel's (mpiexec beside hydra_pmi_proxy)")
    for name in ("mpiexec", "hydra_pmi_proxy"):  # mpiexec starts the proxy found beside itself
        (venv / "bin" / name).symlink_to(wheel_bin / name)
    script = HERE.parent / "launch" / "mpirun.sh"
    bare_path = os.pathsep.join(d for d in ("/usr/bin", "/bin") if os.path.isdir(d))
    env = {**os.environ, "PYTHON": str(venv / "bin" / "python"), "PATH": bare_path}
    done = subprocess.run(["bash", str(script), "2", "--epochs", "1", "--progress", "none",
                           "--metrics", str(tmp_path / "m.jsonl")], capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.jsonl").read_text().count("test_accuracy") == 1


def test_a_launchers_rank_is_read_with_its_own_size():
    from distbp.comm.mpi import launcher_rank

    assert launcher_rank({"PMI_RANK": "1", "PMI_SIZE": "3"}) == (1, 3)
    # a global Slurm rank beside another launcher's per-machine count: "rank 5 of 4"
    assert launcher_rank({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "MPI_LOCALNRANKS": "4"}) == (5, 8)
    assert launcher_rank({"SLURM_PROCID": "5"}) is None
