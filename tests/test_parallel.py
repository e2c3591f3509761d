"""Data parallelism in the single-process test mode: communicators on threads, DataParallel, the trainer."""

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import distbp
from distbp import nn
from distbp.autograd import Tensor
from distbp.autograd.ops import cross_entropy
from distbp.comm import CollectiveTimeout, GroupAborted, LocalCommunicator, RankFailed, ThreadGroup, run_ranks
from distbp.parallel import DataParallel, ModelMismatch, UnusedParameters
from distbp.train import Trainer, make_config
from distbp.train.checkpoint import load_safetensors
from distbp.train.steps import AllReduceStep, allreduce_step
from two_heads import TwoHeads

# --- communicators --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
def test_thread_collectives(size):
    def body(comm):
        a = np.full(3, comm.rank + 1, np.float32)
        comm.allreduce(a)
        m = np.full(2, float(comm.rank), np.float64)
        comm.allreduce(m, "mean")
        b = np.full(2, comm.rank, np.int64)
        comm.broadcast(b, root=size - 1)
        handles = [comm.iallreduce(np.ones(4, np.float32) * i) for i in range(3)]
        for h in handles:
            h.wait()
        comm.barrier()
        return a, m, b, comm.allgather({"rank": comm.rank})

    for rank, (a, m, b, gathered) in enumerate(run_ranks(size, body)):
        np.testing.assert_array_equal(a, np.full(3, size * (size + 1) / 2))
        np.testing.assert_allclose(m, np.full(2, (size - 1) / 2))
        np.testing.assert_array_equal(b, np.full(2, size - 1))
        assert gathered == [{"rank": r} for r in range(size)]


def test_local_communicator_is_identity():
    comm = LocalCommunicator()
    a = np.arange(4, dtype=np.float32)
    comm.allreduce(a)
    comm.broadcast(a)
    np.testing.assert_array_equal(a, np.arange(4))
    assert comm.allgather(7) == [7] and comm.size == 1


def test_collective_buffers_are_checked():
    comm = LocalCommunicator()
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(np.ones((4, 4), np.float32)[:, ::2])
    with pytest.raises(TypeError, match="numpy array"):
        comm.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="op must be"):
        comm.allreduce(np.ones(2, np.float32), "max")


def test_a_missing_rank_times_out_naming_it():
    group = ThreadGroup(3, timeout=0.5)
    comms = group.communicators()
    errors = {}

    def body(rank):
        try:
            if rank != 2:  # rank 2 never arrives
                comms[rank].allreduce(np.ones(2, np.float32))
        except Exception as e:
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 5
    assert set(errors) == {0, 1}
    messages = [str(e) for e in errors.values()]
    assert any(isinstance(e, CollectiveTimeout) and "[2] did not arrive" in str(e) for e in errors.values()), messages


def test_a_failing_rank_stops_the_others_instead_of_hanging():
    def body(comm):
        if comm.rank == 1:
            raise ValueError("rank one is broken")
        comm.allreduce(np.ones(2, np.float32))  # would wait forever for rank 1
        return "unreachable"

    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed: ValueError: rank one is broken") as info:
        run_ranks(3, body, timeout=60)
    assert time.monotonic() - start < 10
    assert info.value.rank == 1


def test_ranks_that_fail_alike_are_named_as_such_not_by_the_first_thread_to_fail():
    # a refused checkpoint fails every rank the same way: "rank 4 failed" suggested rank 4 was at fault
    def body(comm):
        time.sleep(0.01 * (comm.size - comm.rank))  # the last rank fails first
        raise ValueError("the same for all")

    with pytest.raises(RankFailed, match="^every rank failed: ValueError: the same for all") as info:
        run_ranks(4, body, timeout=60)
    assert info.value.every and info.value.rank == 0

    def some(comm):
        if comm.rank in (1, 3):
            time.sleep(0.01 * (comm.size - comm.rank))
            raise ValueError("odd ranks only")
        comm.allreduce(np.ones(2, np.float32))

    with pytest.raises(RankFailed, match="^rank 1 failed: ValueError: odd ranks only") as info:
        run_ranks(4, some, timeout=60)
    assert not info.value.every


_INTERRUPTED_WHILE_WRITING = """
import os, signal, sys, time
from distbp.comm import run_ranks

def body(comm):
    if comm.rank == 0:
        time.sleep(0.3)  # the main thread is waiting for the ranks by now
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        time.sleep(0.5)  # rank 0 is writing its checkpoint: that must be finished, not cut off by the exit
        with open(sys.argv[1], "w") as f:
            f.write("finished")
    else:
        comm.barrier()  # stopped by the abort

try:
    run_ranks(2, body, timeout=60)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_waits_for_every_rank_to_stop_before_the_process_ends(tmp_path):
    # Python 3.11 marks a thread whose join Ctrl-C interrupts as stopped: the process then ended under a
    # rank still writing its checkpoint, and left the checkpoint's temporary file behind
    marker = tmp_path / "written"
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_WHILE_WRITING, str(marker)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "interrupted\n", r.stderr
    assert marker.read_text() == "finished"


def test_collectives_in_different_orders_are_caught():
    def body(comm):
        if comm.rank == 0:
            comm.barrier()
        else:
            comm.allgather(1)

    with pytest.raises(RankFailed, match="different orders"):
        run_ranks(2, body, timeout=10)


def _each_rank(size, body, timeout=5.0):
    """Run body(comm) on thread ranks of one group used directly (no run_ranks to abort the group):
    ({rank: result or exception}, seconds)."""
    comms = ThreadGroup(size, timeout=timeout).communicators()
    outcome = {}

    def run(rank):
        try:
            outcome[rank] = body(comms[rank])
        except Exception as e:
            outcome[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcome, time.monotonic() - start


@pytest.mark.parametrize("case,match", [
    ("shape", r"differ in \(shape, dtype, op\).*rank 0: \(\(4,\)"),
    ("dtype", r"differ in \(shape, dtype, op\).*'float64'"),
    ("op", r"differ in \(shape, dtype, op\).*'mean'"),
    ("root", r"differ in \(shape, dtype, root\)"),
    ("broadcast dtype", r"differ in \(shape, dtype, root\).*'float64'"),
    ("order", "different orders"),
])
def test_ranks_that_call_a_collective_differently_all_fail_at_once(case, match):
    # every rank hears it, at once: not a wrong result (the last rank's op or root won), nor a wait for the
    # timeout with "rank(s) [] did not arrive"
    def body(comm):
        first = comm.rank == 0
        if case == "shape":
            comm.allreduce(np.ones(4 if first else 3, np.float32))
        elif case == "dtype":
            comm.allreduce(np.ones(3, np.float64 if first else np.float32))
        elif case == "op":
            comm.allreduce(np.ones(3, np.float32), "mean" if first else "sum")
        elif case == "root":
            comm.broadcast(np.ones(3, np.float32), root=0 if first else 2)
        elif case == "broadcast dtype":
            comm.broadcast(np.ones(3, np.float64 if first else np.float32), root=0)
        elif first:
            comm.barrier()
        else:
            comm.allreduce(np.ones(3, np.float32))

    outcome, seconds = _each_rank(3, body, timeout=20)
    assert seconds < 10, outcome
    for rank in range(3):
        assert isinstance(outcome[rank], GroupAborted), (rank, outcome)
        assert re.search(match, str(outcome[rank])), (rank, str(outcome[rank]))


def test_a_rank_that_failed_stops_its_own_queued_collectives():
    # its communication thread must not wait out the timeout for peers that have left
    comm = ThreadGroup(2, timeout=60).communicators()[0]
    comm.abort(message="rank 0 broke")
    start = time.monotonic()
    with pytest.raises(GroupAborted, match="rank 0 broke"):
        comm.iallreduce(np.ones(2, np.float32)).wait()
    assert time.monotonic() - start < 5


def test_thread_allgather_gives_each_rank_its_own_copies():
    def body(comm):
        got = comm.allgather({"rank": comm.rank, "items": [comm.rank]})
        got[0]["items"].append(99)  # changes this rank's copy only
        comm.barrier()
        return got

    for rank, got in enumerate(run_ranks(3, body)):
        assert got == [{"rank": r, "items": [r] + ([99] if r == 0 else [])} for r in range(3)], rank
    with pytest.raises(RankFailed, match="pickle"):  # as MPI's allgather, which pickles
        run_ranks(2, lambda comm: comm.allgather(lambda: 1), timeout=5)


def test_an_array_cannot_be_all_reduced_twice_at_once():
    def body(comm):
        a = np.ones(3, np.float32)
        handle = comm.iallreduce(a)
        with pytest.raises(RuntimeError, match="still being all-reduced"):
            comm.iallreduce(a)
        handle.wait()
        comm.allreduce(a)  # once finished, it may be all-reduced again
        return a

    for a in run_ranks(2, body):
        np.testing.assert_array_equal(a, np.full(3, 4.0))


@pytest.mark.parametrize("size", [1, 2])
def test_the_mean_of_integer_arrays_is_refused_on_every_backend(size):
    comm = LocalCommunicator() if size == 1 else ThreadGroup(size).communicators()[0]
    a = np.array([3, 4], np.int64)
    with pytest.raises(ValueError, match="'mean' needs a floating-point array"):
        comm.iallreduce(a, "mean")
    np.testing.assert_array_equal(a, [3, 4])


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_communicator_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ThreadGroup(2).communicators(timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        LocalCommunicator(timeout=timeout)


def test_a_rank_that_returns_before_a_collective_ends_its_peers_wait_at_once():
    # a program error (one rank makes fewer collectives): its peers used to wait for the whole timeout
    def rank(comm):
        if comm.rank == 1:
            handle = comm.iallreduce(np.ones(2, np.float32))  # queued before its close: still entered
            handle.wait()
            return "early"
        comm.allreduce(np.ones(2, np.float32))
        comm.barrier()  # rank 1 never comes
        return "late"

    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"barrier \(collective #2\) cannot complete: rank\(s\) \[1\] closed"):
        run_ranks(2, rank, timeout=60)
    assert time.monotonic() - start < 10


def test_a_timeout_past_what_a_thread_wait_takes_means_wait_as_long_as_it_takes():
    # 1e10 s (meaning "never") is past threading.TIMEOUT_MAX: the wait once raised OverflowError
    def rank(comm):
        if comm.rank == 1:
            time.sleep(0.2)  # rank 0 waits in the collective meanwhile
        buf = np.full(3, comm.rank + 1.0, np.float32)
        comm.allreduce(buf, "sum")
        return buf

    for result in run_ranks(2, rank, timeout=1e10):
        np.testing.assert_array_equal(result, [3, 3, 3])


# --- DataParallel ---------------------------------------------------------------------------------


def _mlp(seed=0, widths=(8, 16, 16, 4)):
    distbp.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _data(n=64, features=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype(np.float32), rng.integers(0, classes, n)


def _grads(model):
    return {n: p.grad.data.copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("cap_mb", [25.0, 1e-9])
def test_averaged_gradients_equal_the_global_batch(size, cap_mb):
    x, y = _data()
    reference = _mlp()
    cross_entropy(reference(Tensor(x)), y).backward()
    expected = _grads(reference)

    def body(comm):
        model = _mlp(seed=0 if comm.rank == 0 else comm.rank + 100)  # rank 0's initialisation must win
        ddp = DataParallel(model, comm, bucket_cap_mb=cap_mb)
        shard = slice(comm.rank * len(x) // size, (comm.rank + 1) * len(x) // size)
        cross_entropy(ddp(Tensor(x[shard])), y[shard]).backward()
        ddp.synchronize()
        return _grads(model), len(ddp.buckets), ddp.allreduce_calls

    n_params = len(list(reference.parameters()))
    for grads, n_buckets, calls in run_ranks(size, body):
        assert n_buckets == (n_params if cap_mb < 1 else 1) and calls == n_buckets
        for name in expected:
            np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_many_small_parameters_make_few_allreduce_calls():
    def body(comm):
        distbp.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])  # 100 parameters
        ddp = DataParallel(model, comm)
        ddp(Tensor(np.ones((2, 4)))).sum().backward()
        ddp.synchronize()
        return ddp.allreduce_calls

    assert run_ranks(2, body) == [1, 1]


def test_first_bucket_allreduce_starts_before_backward_ends():
    def body(comm):
        distbp.manual_seed(0)
        model = nn.Sequential(*[layer for _ in range(6) for layer in (nn.Linear(256, 256), nn.Tanh())])
        ddp = DataParallel(model, comm, bucket_cap_mb=0.3)  # about one layer per bucket
        x = Tensor(np.random.default_rng(comm.rank).standard_normal((64, 256)))
        loss = ddp(x).sum()
        loss.backward()
        backward_done = time.perf_counter()
        ddp.synchronize()
        return ddp.buckets[0].launched_at, backward_done, len(ddp.buckets)

    for launched, backward_done, n_buckets in run_ranks(2, body):
        assert n_buckets >= 4
        assert launched < backward_done


def test_broadcast_makes_parameters_identical_at_start():
    def body(comm):
        model = _mlp(seed=comm.rank)
        DataParallel(model, comm)
        return {n: p.data.copy() for n, p in model.named_parameters()}

    ranks = run_ranks(3, body)
    for other in ranks[1:]:
        for name, value in ranks[0].items():
            np.testing.assert_array_equal(other[name], value)


def test_frozen_parameters_are_broadcast_and_checked_too():
    def body(comm):
        model = _mlp(seed=comm.rank)
        first = next(model.parameters())
        first.requires_grad_(False)  # frozen: no gradient, but every replica must still hold rank 0's values
        DataParallel(model, comm)
        return first.data.copy()

    ranks = run_ranks(2, body)
    np.testing.assert_array_equal(ranks[1], ranks[0])

    def frozen_on_one_rank(comm):
        model = _mlp()
        next(model.parameters()).requires_grad_(comm.rank == 0)
        DataParallel(model, comm)

    with pytest.raises(RankFailed, match=r"\(frozen\)"):
        run_ranks(2, frozen_on_one_rank, timeout=20)


def test_read_only_frozen_parameters_are_compared_not_broadcast():
    def body(comm, differ):
        model = _mlp()
        first = next(model.parameters())
        first.requires_grad_(False)
        values = first.data.copy() + (comm.rank if differ else 0)
        values.flags.writeable = False  # a frozen table mapped read-only from a file, say
        first.data = values
        DataParallel(model, comm)
        return True

    assert run_ranks(2, lambda c: body(c, False)) == [True, True]
    with pytest.raises(RankFailed, match="read-only parameter 0.weight differs between rank 0 and rank 1"):
        run_ranks(2, lambda c: body(c, True), timeout=20)


@pytest.mark.parametrize("option,values", [("bucket_cap_mb", (25.0, 1.0)), ("compress", (None, "fp16")),
                                           ("allow_unused", (False, True)), ("average", (True, False))])
def test_ranks_given_different_options_fail_naming_the_option(option, values):
    def body(comm):
        DataParallel(_mlp(), comm, **{option: values[comm.rank]})

    with pytest.raises(RankFailed, match=f"rank 1 was given {option}="):
        run_ranks(2, body, timeout=20)


def test_different_models_fail_on_every_rank_naming_the_difference():
    failures = []

    def body(comm):
        model = _mlp(widths=(8, 16, 4) if comm.rank == 1 else (8, 16, 16, 4))
        try:
            DataParallel(model, comm)
        except ModelMismatch as e:
            failures.append(str(e))
            raise

    with pytest.raises(RankFailed):
        run_ranks(2, body, timeout=20)
    assert failures and all("rank 1 has a different model" in f and "parameter #" in f for f in failures)
    assert len(failures) == 2  # every rank stops with the message, none waits for the others


def test_unused_parameters_are_named_or_zeroed():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(self.body(x))

    def body(comm, allow):
        distbp.manual_seed(0)
        model = TwoHeads()
        ddp = DataParallel(model, comm, allow_unused=allow)
        ddp(Tensor(np.ones((2, 4)))).sum().backward()
        ddp.synchronize()
        return model.unused.weight.grad

    with pytest.raises(RankFailed, match=r"unused\.weight, unused\.bias"):
        run_ranks(2, lambda c: body(c, False), timeout=20)
    # unused on every rank: no gradient at all (as in PyTorch DDP), so no optimizer moves it
    assert run_ranks(2, lambda c: body(c, True)) == [None, None]


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x, heads):
        h = self.body(x)
        return sum(getattr(self, k)(h).sum() for k in heads)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_with_allow_unused_training_equals_one_process_when_a_head_is_used_on_some_steps_and_ranks(optimizer,
                                                                                                   set_to_none):
    # head b: unused on every rank at even steps (its .grad stays None, as in one process, so momentum and
    # weight decay leave it alone; or, zeroed in place, stays a zero gradient that they act on), used on
    # rank 1 only at odd steps
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 2, 4)).astype(np.float32) for _ in range(6)]

    def heads(step, rank):
        return "ab" if step % 2 and rank == 1 else "a"

    def make():
        distbp.manual_seed(0)
        model = _Heads()
        opt = (distbp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) if optimizer == "sgd"
               else distbp.optim.Adam(model.parameters(), lr=0.01))
        return model, opt

    model, opt = make()
    for step, x in enumerate(xs):
        opt.zero_grad(set_to_none)
        loss = sum(model(Tensor(x[r]), heads(step, r)) for r in range(2)) * (1 / 2)
        loss.backward()
        opt.step()
    expected = {n: p.data.copy() for n, p in model.named_parameters()}

    def body(comm):
        model, opt = make()
        ddp = DataParallel(model, comm, allow_unused=True)
        for step, x in enumerate(xs):
            opt.zero_grad(set_to_none)
            ddp(Tensor(x[comm.rank]), heads(step, comm.rank)).backward()
            ddp.synchronize()
            opt.step()
        return {n: p.data.copy() for n, p in model.named_parameters()}

    for got in run_ranks(2, body):
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_changing_which_parameters_train_after_construction_is_an_error(change):
    def body(comm):
        model = _mlp()
        if change == "unfreeze":
            model[0].bias.requires_grad = False
        ddp = DataParallel(model, comm)
        model[0].bias.requires_grad = change == "unfreeze"
        cross_entropy(ddp(Tensor(np.ones((2, 8), np.float32))), np.zeros(2, np.int64)).backward()
        ddp.synchronize()

    with pytest.raises(RankFailed, match=r"0\.bias changed requires_grad after DataParallel was built"):
        run_ranks(2, body, timeout=20)


def test_ranks_with_different_buffers_are_stopped_naming_the_buffer():
    def body(comm):
        model = _mlp()
        model.register_buffer("running", np.zeros(3 if comm.rank == 0 else 4, np.float32))
        DataParallel(model, comm)

    with pytest.raises(RankFailed, match=r"running \[4\] float32 \(buffer\) on rank 1 but running \[3\]"):
        run_ranks(2, body, timeout=20)


def test_buffers_that_are_not_contiguous_are_broadcast_and_read_only_ones_compared():
    def body(comm, frozen_value):
        model = _mlp()
        model.register_buffer("strided", np.full((4, 6), float(comm.rank), np.float32)[:, ::2])  # not contiguous
        frozen = np.full(3, frozen_value(comm.rank), np.float32)
        frozen.flags.writeable = False
        model.register_buffer("frozen", frozen)
        DataParallel(model, comm)
        return model.strided.copy()

    for strided in run_ranks(2, lambda c: body(c, lambda r: 1.0)):
        np.testing.assert_array_equal(strided, np.zeros((4, 3)))  # rank 0's values everywhere
    with pytest.raises(RankFailed, match="the read-only buffer frozen differs between rank 0 and rank 1"):
        run_ranks(2, lambda c: body(c, float), timeout=20)


def test_a_model_cannot_be_wrapped_twice_until_closed():
    model = _mlp()
    first = DataParallel(model, LocalCommunicator())
    with pytest.raises(RuntimeError, match="already wrapped by a DataParallel"):
        DataParallel(model, LocalCommunicator())
    first.close()
    DataParallel(model, LocalCommunicator())


def test_after_a_failed_synchronize_the_wrapper_says_it_cannot_continue():
    ddp = DataParallel(_mlp(), LocalCommunicator())
    ddp(Tensor(np.ones((2, 8), np.float32)))  # no backward: nothing received a gradient
    with pytest.raises(RuntimeError, match="no parameter received a gradient"):
        ddp.synchronize()
    with pytest.raises(RuntimeError, match="cannot continue after this error: RuntimeError: DataParallel: "
                                           "synchronize\\(\\): no parameter"):
        cross_entropy(ddp(Tensor(np.ones((2, 8), np.float32))), np.zeros(2, np.int64)).backward()


def test_the_wrapper_is_the_module_for_everything_else():
    model = _mlp()
    ddp = DataParallel(model, LocalCommunicator())
    assert list(ddp.state_dict()) == list(model.state_dict())  # no "module." prefix
    ddp.eval()
    assert not model.training and not ddp.training
    ddp.train()
    assert model.training
    assert [n for n, _ in ddp.named_parameters()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(AttributeError):
        ddp.no_such_thing


def test_no_sync_accumulation_equals_the_large_batch():
    x, y = _data(n=64)
    reference = _mlp()
    for part in range(4):  # four micro-batches accumulated in one process
        sl = slice(part * 16, (part + 1) * 16)
        cross_entropy(reference(Tensor(x[sl])), y[sl]).backward()
    expected = {n: g / 2 for n, g in _grads(reference).items()}  # average over two ranks of 2-sums

    def body(comm):
        model = _mlp()
        ddp = DataParallel(model, comm)
        micro = [slice(comm.rank * 32 + k * 16, comm.rank * 32 + (k + 1) * 16) for k in range(2)]
        with ddp.no_sync():
            cross_entropy(ddp(Tensor(x[micro[0]])), y[micro[0]]).backward()
        calls_during_no_sync = ddp.allreduce_calls
        cross_entropy(ddp(Tensor(x[micro[1]])), y[micro[1]]).backward()
        ddp.synchronize()
        return _grads(model), calls_during_no_sync

    for grads, calls in run_ranks(2, body):
        assert calls == 0
        for name in expected:
            np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_parameter_used_only_under_no_sync_keeps_what_it_accumulated():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.extra = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x, use_extra):
            h = self.body(x)
            return self.head(h) + self.extra(h) if use_extra else self.head(h)

    x = np.random.default_rng(3).standard_normal((2, 8, 4)).astype(np.float32)

    def build():
        distbp.manual_seed(0)
        return TwoHeads()

    reference = build()
    for micro, use in ((0, True), (1, False)):  # the global batch: both ranks' halves of each micro-batch
        reference(Tensor(x[micro]), use).sum().backward()
    expected = {n: g / 2 for n, g in _grads(reference).items()}  # DataParallel averages over 2 ranks

    def body(comm):
        model = build()
        ddp = DataParallel(model, comm, allow_unused=True)
        mine = slice(comm.rank * 4, comm.rank * 4 + 4)
        for _ in range(2):  # the second step starts from .grad set to None again
            for p in model.parameters():
                p.grad = None
            with ddp.no_sync():
                model(Tensor(x[0][mine]), True).sum().backward()
            model(Tensor(x[1][mine]), False).sum().backward()  # extra gets nothing here
            ddp.synchronize()
        return _grads(model)

    for grads in run_ranks(2, body):
        for name in expected:
            np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_second_backward_before_synchronize_is_an_error():
    x, y = _data()

    def body(comm):
        model = _mlp()
        ddp = DataParallel(model, comm)
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        with pytest.raises(RuntimeError, match=r"parameter 4\.weight got a second gradient before synchronize\(\)"):
            cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        return True

    assert run_ranks(1, body) == [True]


def test_after_a_second_gradient_the_wrapper_refuses_to_go_on_rather_than_sum_it_in():
    # the second gradient was already added into its bucket slice (which may be in flight): a synchronize()
    # after the error would hand back a wrong sum
    x, y = _data()

    def body(comm):
        ddp = DataParallel(_mlp(), comm)
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        with pytest.raises(RuntimeError, match="second gradient before synchronize.*cannot go on"):
            cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        with pytest.raises(RuntimeError, match="cannot continue after this error: DataParallel: parameter"):
            ddp.synchronize()
        return True

    assert run_ranks(2, body) == [True, True]


def _two_heads_step(comm, wrappers, between):
    """One allow_unused step of `wrappers` models, `extra` used on rank 1 only, with `between(comm, losses)`
    run between the backwards and the synchronize() calls; returns (each model's gradients, between's)."""
    models, ddps, losses = [], [], []
    for _ in range(wrappers):
        distbp.manual_seed(0)
        models.append(TwoHeads())
        ddps.append(DataParallel(models[-1], comm, allow_unused=True, bucket_cap_mb=1e-9))
    x = np.ones((3, 4), np.float32) * (comm.rank + 1)
    for ddp in ddps:
        losses.append(ddp(Tensor(x), comm.rank == 1))
        losses[-1].backward()
    seen = between(comm, losses)
    for ddp in ddps:
        ddp.synchronize()
        ddp.close()
    return [{n: p.grad.data.copy() for n, p in m.named_parameters() if p.grad is not None} for m in models], seen


def test_the_callers_collectives_between_backward_and_synchronize_never_pair_with_a_bucket():
    # With allow_unused, rank 0 starts the bucket of `extra` in synchronize(), rank 1 in backward: on one
    # shared communicator a collective in between paired with it (a wrong loss and wrong gradients, or a
    # "calls differ" error); the wrapper's own copy of the communicator keeps them apart
    def log_loss(comm, losses):
        total = np.array([losses[0].item()], np.float32)
        comm.allreduce(total)
        return float(total[0])

    reference = []  # each rank's step alone: the two ranks must end with the mean of their gradients
    for rank in range(2):
        alone = LocalCommunicator()
        alone.rank = rank
        reference.append(_two_heads_step(alone, 1, lambda comm, losses: losses[0].item()))
    for wrappers, between in [(1, log_loss), (2, lambda comm, losses: None)]:
        results = run_ranks(2, lambda comm: _two_heads_step(comm, wrappers, between), timeout=20)
        for grads_of_models, seen in results:
            if between is log_loss:
                assert seen == pytest.approx(reference[0][1] + reference[1][1], rel=1e-6)
            for grads in grads_of_models:
                for name in grads:
                    mean = sum(r[0][0].get(name, 0) for r in reference) / 2
                    np.testing.assert_allclose(grads[name], mean, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_wrapper_that_failed_closes_and_the_model_can_be_wrapped_again():
    x, y = _data()

    def body(comm):
        model = _mlp()
        ddp = DataParallel(model, comm, bucket_cap_mb=1e-9)
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        with pytest.raises(RuntimeError, match="second gradient"):
            cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        ddp.close()
        ddp = DataParallel(model, comm)
        model.zero_grad()
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        ddp.synchronize()
        ddp.close()
        return True

    assert run_ranks(2, body, timeout=20) == [True, True]


def test_a_zero_dimensional_buffer_updated_out_of_place_stays_an_array_and_is_broadcast():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("scale", np.array(1.0, np.float32))

    def body(comm):
        model = Scaled()
        model.scale = model.scale * np.float32(0.5 if comm.rank == 0 else 0.25)  # numpy gives a scalar
        assert isinstance(model.scale, np.ndarray) and model.scale.shape == ()
        DataParallel(model, comm).close()
        return float(model.scale)

    assert run_ranks(2, body) == [0.5, 0.5]
    with pytest.raises(TypeError, match="cannot assign a float to buffer 'scale'"):
        Scaled().scale = 0.5


def test_parameters_that_are_not_contiguous_are_broadcast_and_read_only_ones_must_agree():
    def body(comm):
        model = _mlp(seed=comm.rank)
        layer = model[0]
        layer.weight.data = np.ascontiguousarray(layer.weight.data.T).T  # writeable, not C-contiguous
        DataParallel(model, comm)
        assert not model[0].weight.data.flags.c_contiguous
        return {n: p.data.copy() for n, p in model.named_parameters()}

    first, second = run_ranks(2, body)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])

    def read_only_on_rank_1(comm):
        model = _mlp()
        model[0].bias.requires_grad_(False)
        if comm.rank == 1:
            model[0].bias.data.flags.writeable = False
        DataParallel(model, comm)

    with pytest.raises(RankFailed, match=r"parameter #1 is 0\.bias \[16\] float32 \(frozen\) \(read-only\) on rank 1"):
        run_ranks(2, read_only_on_rank_1)


def test_a_second_synchronize_after_one_backward_is_an_error():
    x, y = _data()

    def body(comm):
        ddp = DataParallel(_mlp(), comm)
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        ddp.synchronize()
        reduced = [p.grad.data.copy() for p in ddp.parameters()]
        with pytest.raises(RuntimeError, match="no parameter received a gradient since the last synchronize"):
            ddp.synchronize()
        for p, g in zip(ddp.parameters(), reduced):  # left as they were
            np.testing.assert_array_equal(p.grad.data, g)
        return True

    assert run_ranks(2, body) == [True, True]


def test_with_allow_unused_a_rank_without_data_contributes_zeros():
    x, y = _data()

    def body(comm):
        ddp = DataParallel(_mlp(), comm, allow_unused=True)
        if comm.rank == 0:  # rank 1 has no data this step: no backward, but it takes part in the step
            cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        ddp.synchronize()
        return [p.grad.data.copy() for p in ddp.parameters()]

    reference = _mlp()
    cross_entropy(reference(Tensor(x[:8])), y[:8]).backward()
    for grads in run_ranks(2, body):
        for g, p in zip(grads, reference.parameters()):
            np.testing.assert_allclose(g, p.grad.data / 2, rtol=1e-6)


def test_synchronize_inside_no_sync_is_an_error_and_reduces_nothing():
    x, y = _data()

    def body(comm):
        ddp = DataParallel(_mlp(), comm)
        with ddp.no_sync():
            cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
            with pytest.raises(RuntimeError, match=r"synchronize\(\) inside no_sync\(\)"):
                ddp.synchronize()  # it used to return at once, and each rank stepped on its own gradient
        return ddp.allreduce_calls

    assert run_ranks(2, body) == [0, 0]


def test_a_backward_under_no_sync_after_a_synchronized_one_is_an_error():
    # it added into buckets already sent: the result was the mean of the first plus the sum of the second
    x, y = _data()

    def body(comm):
        ddp = DataParallel(_mlp(), comm)
        cross_entropy(ddp(Tensor(x[:8])), y[:8]).backward()
        with ddp.no_sync(), pytest.raises(RuntimeError, match="under no_sync\\(\\) after a backward outside it"):
            cross_entropy(ddp(Tensor(x[8:16])), y[8:16]).backward()
        return True

    assert run_ranks(2, body) == [True, True]


@pytest.mark.parametrize("allow_unused", [False, True])
def test_backwards_only_under_no_sync_are_reduced_by_the_next_synchronize(allow_unused):
    x, y = _data()
    reference = _mlp()
    cross_entropy(reference(Tensor(x[:16])), y[:16]).backward()  # both ranks' halves: the mean of 2 means

    def body(comm):
        model = _mlp()
        ddp = DataParallel(model, comm, allow_unused=allow_unused)
        mine = slice(comm.rank * 8, comm.rank * 8 + 8)
        with ddp.no_sync():
            cross_entropy(ddp(Tensor(x[mine])), y[mine]).backward()
        ddp.synchronize()  # (without allow_unused it named every parameter as unused)
        return _grads(model)

    for grads in run_ranks(2, body):
        for name, g in _grads(reference).items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_with_allow_unused_a_gradient_kept_from_the_last_step_is_kept_by_a_rank_that_does_not_use_it():
    # as in PyTorch DDP: a rank's .grad goes in whole; it used to be zeroed on the rank that did not use the
    # parameter this step, so the mean lost half of what every rank had kept
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.extra = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x, use_extra):
            return self.head(x) + self.extra(x) if use_extra else self.head(x)

    x = np.random.default_rng(5).standard_normal((2, 8, 4)).astype(np.float32)

    def build():
        distbp.manual_seed(0)
        return TwoHeads()

    # step 1: both ranks use both heads; step 2 (no zero_grad): only rank 0 uses extra
    reference = build()
    reference(Tensor(x[0]), True).sum().backward()
    reference(Tensor(x[1][:4]), True).sum().backward()
    reference(Tensor(x[1][4:]), False).sum().backward()
    expected = {n: g / 2 for n, g in _grads(reference).items()}  # the mean over 2 ranks at every step

    def body(comm):
        model = build()
        ddp = DataParallel(model, comm, allow_unused=True)
        mine = slice(comm.rank * 4, comm.rank * 4 + 4)
        model(Tensor(x[0][mine]), True).sum().backward()
        ddp.synchronize()
        model(Tensor(x[1][mine]), comm.rank == 0).sum().backward()
        ddp.synchronize()
        kept = _grads(model)
        ddp.synchronize()  # a second call leaves the mean as it is (it used to zero every gradient)
        return kept, _grads(model)

    for kept, again in run_ranks(2, body):
        for name in expected:
            np.testing.assert_allclose(kept[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(again[name], kept[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("cap", [float("nan"), "25", True, 0, -1.0])
def test_a_bucket_cap_that_is_not_a_positive_number_is_refused(cap):
    with pytest.raises(ValueError, match=re.escape(f"bucket_cap_mb must be a positive number of MB, got {cap!r}")):
        DataParallel(_mlp(), LocalCommunicator(), bucket_cap_mb=cap)


def test_bool_all_reduces_and_roots_that_are_not_ranks_are_refused_alike_on_every_backend():
    def body(comm):
        with pytest.raises(TypeError, match="a bool array has no sum"):
            comm.allreduce(np.array([True, False]))
        with pytest.raises(TypeError, match="root must be an integer rank, not 1.0"):
            comm.broadcast(np.ones(2, np.float32), root=1.0)
        with pytest.raises(ValueError, match="root 2 is not a rank of a group of 2"):
            comm.broadcast(np.ones(2, np.float32), root=2)
        return True

    assert run_ranks(2, body) == [True, True]
    with pytest.raises(TypeError, match="a bool array has no sum"):
        LocalCommunicator().allreduce(np.array([True]))


def test_close_gives_the_buckets_back_and_compression_does_not_take_shared_ones():
    class Recording(LocalCommunicator):
        def __init__(self):
            super().__init__()
            self.made, self.released = [], []

        def buffer(self, size, dtype=np.float32):
            self.made.append(super().buffer(size, dtype))
            return self.made[-1]

        def release(self, array):
            self.released.append(array)

        def dup(self):  # the wrapper's collectives go to its copy: this one records them
            return self

    comm = Recording()
    ddp = DataParallel(_mlp(), comm, bucket_cap_mb=1e-9)
    assert len(comm.made) == len(ddp.buckets) == 6
    ddp.close()
    assert [id(a) for a in comm.released] == [id(a) for a in comm.made]
    DataParallel(_mlp(), Recording(), compress="fp16").close()
    fp16 = Recording()
    DataParallel(_mlp(), fp16, compress="fp16")
    assert fp16.made == []


def test_fp16_compression_is_close_to_full_precision():
    x, y = _data()

    def body(comm, compress):
        model = _mlp()
        ddp = DataParallel(model, comm, compress=compress)
        shard = slice(comm.rank * 32, (comm.rank + 1) * 32)
        cross_entropy(ddp(Tensor(x[shard])), y[shard]).backward()
        ddp.synchronize()
        return _grads(model)

    full = run_ranks(2, lambda c: body(c, None))[0]
    half = run_ranks(2, lambda c: body(c, "fp16"))[0]
    for name in full:
        assert half[name].dtype == np.float32
        np.testing.assert_allclose(half[name], full[name], rtol=2e-2, atol=1e-3, err_msg=name)


# --- training: N ranks equal one process on the global batch --------------------------------------


def _train_ranks(size, **cfg):
    cfg.setdefault("progress", "none")
    trainers = [None] * size

    def body(comm):
        config = make_config(cfg)
        trainer = Trainer(config, allreduce_step(config, comm))
        trainers[comm.rank] = trainer
        return trainer.fit()

    run_ranks(size, body, timeout=120)
    return trainers


def _params(trainer):
    return {n: p.data.copy() for n, p in trainer.model.named_parameters()}


EQUIVALENCE = dict(dataset="synthetic", synthetic_size=2000, hidden=[32], epochs=2)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 1e-3)])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_n_ranks_train_like_one_process_on_the_global_batch(size, optimizer, lr):
    common = dict(EQUIVALENCE, optimizer=optimizer, lr=lr, momentum=0.9)
    single = Trainer(make_config({**common, "batch_size": 16 * 4, "progress": "none"}))
    single.fit()
    ranks = _train_ranks(size, **common, batch_size=16 * 4 // size)
    assert all(t.step == single.step for t in ranks) and single.step > 50
    expected = _params(single)
    for trainer in ranks:
        for name, value in expected.items():
            np.testing.assert_allclose(_params(trainer)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_equivalence_holds_with_one_bucket_per_parameter():
    common = dict(EQUIVALENCE, optimizer="sgd", lr=0.05)
    single = Trainer(make_config({**common, "batch_size": 32, "progress": "none"}))
    single.fit()
    ranks = _train_ranks(2, **common, batch_size=16, bucket_cap_mb=1e-9)
    assert len(ranks[0].strategy.ddp.buckets) == len(list(single.model.parameters()))
    for name, value in _params(single).items():
        np.testing.assert_allclose(_params(ranks[1])[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_data_set_size_not_divisible_by_world_size_does_not_deadlock():
    ranks = _train_ranks(3, dataset="synthetic", synthetic_size=1001, hidden=[16], epochs=2, batch_size=10)
    steps = {t.step for t in ranks}
    assert len(steps) == 1 and steps.pop() == 2 * ranks[0].steps_per_epoch
    for other in ranks[1:]:
        for name, value in _params(ranks[0]).items():
            np.testing.assert_array_equal(_params(other)[name], value)


def test_ranks_with_different_configs_stop_at_start_up():
    def body(comm):
        cfg = dict(epochs=1, progress="none", lr=0.1 if comm.rank == 0 else 0.2)
        Trainer(make_config(cfg), AllReduceStep(comm)).fit()

    with pytest.raises(RankFailed, match=r"lr = 0\.2 but rank 0 with 0\.1"):
        run_ranks(2, body, timeout=30)


def test_only_rank_zero_writes_checkpoints_metrics_and_progress(tmp_path):
    import io

    streams = [io.StringIO() for _ in range(2)]

    def body(comm):
        cfg = dict(epochs=2, progress="plain", metrics=str(tmp_path / "m.jsonl"), checkpoint=str(tmp_path / "c.ckpt"),
                   trace=str(tmp_path / "trace.json"))
        return Trainer(make_config(cfg), AllReduceStep(comm), stream=streams[comm.rank]).fit()

    summaries = run_ranks(2, body)
    assert streams[0].getvalue() and not streams[1].getvalue()
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]  # evaluation combined over ranks
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "c.ckpt").exists()
    import json

    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    spans = {(e["pid"], e["name"]) for e in events if e["ph"] == "X"}
    for rank in (0, 1):
        assert {(rank, "forward"), (rank, "backward"), (rank, "allreduce bucket 0")} <= spans


def test_resume_with_dropout_restores_every_ranks_random_stream(tmp_path, tiny_charlm):
    common = {**tiny_charlm, "batch_size": 4}
    whole = _train_ranks(2, **common)
    ckpt = tmp_path / "lm.ckpt"
    _train_ranks(2, **common, checkpoint=str(ckpt), max_steps=9)
    _, meta = load_safetensors(ckpt)
    rngs = json.loads(meta["distbp"])["state"]["rng"]
    assert len(rngs) == 2 and rngs[0] != rngs[1]  # each rank draws its own dropout masks
    resumed = _train_ranks(2, **common, checkpoint=str(ckpt), resume=True)
    for name, value in _params(whole[0]).items():
        np.testing.assert_array_equal(_params(resumed[0])[name], value, err_msg=name)


def test_a_checkpoint_holding_one_generator_state_still_resumes_on_every_rank(tmp_path):
    from distbp.train.checkpoint import save_safetensors

    ckpt = tmp_path / "c.ckpt"
    _train_ranks(2, epochs=2, max_steps=10, checkpoint=str(ckpt))
    arrays, meta = load_safetensors(ckpt)
    info = json.loads(meta["distbp"])
    info["state"]["rng"] = info["state"]["rng"][0]  # the format before every rank's state was kept
    save_safetensors(ckpt, arrays, {"distbp": json.dumps(info)})
    resumed = _train_ranks(2, epochs=2, checkpoint=str(ckpt), resume=True)
    assert all(t.step == 2 * t.steps_per_epoch for t in resumed)


def test_resume_needs_the_same_world_size(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    _train_ranks(2, epochs=2, max_steps=10, checkpoint=str(ckpt))
    with pytest.raises(RankFailed, match="resume with the same world size"):
        _train_ranks(3, epochs=2, checkpoint=str(ckpt), resume=True)


def test_group_aborted_is_a_comm_error():
    assert issubclass(GroupAborted, Exception) and issubclass(UnusedParameters, RuntimeError)


class _Scaled(nn.Module):
    """A layer whose parameter's gradient comes from an elementwise op (no destination: copied in)."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(np.linspace(0.5, 1.5, n).astype(np.float32))

    def forward(self, x):
        return x * self.gain


def _steps_noting_gradients_written_in_buckets(model, ddp, x, y, steps=2):
    """Train `steps` steps on (x, y) (the second reuses the bucket memory); for each, which parameters'
    gradients their ops computed right in their bucket slices (looked at before synchronize)."""
    written = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        cross_entropy(ddp(Tensor(x)), y).backward()
        written.append({n: p.grad.data is ddp._bucket_of[id(p)].views[id(p)] for n, p in model.named_parameters()})
        ddp.synchronize()
    return written


@pytest.mark.parametrize("cap_mb", [25.0, 1e-9])
def test_gradients_are_written_into_their_buckets_and_averaged(cap_mb):
    x, y = _data()

    def build():
        distbp.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), _Scaled(16), nn.Linear(16, 4))

    reference = build()
    cross_entropy(reference(Tensor(x)), y).backward()
    expected = _grads(reference)

    def body(comm):
        model = build()
        ddp = DataParallel(model, comm, bucket_cap_mb=cap_mb)
        shard = slice(comm.rank * 32, (comm.rank + 1) * 32)
        written = _steps_noting_gradients_written_in_buckets(model, ddp, x[shard], y[shard])[-1]
        synced = _grads(model)
        in_buckets = all(any(np.shares_memory(p.grad.data, b.buffer) for b in ddp.buckets)
                         for p in model.parameters())
        ddp.close()
        for p in model.parameters():
            p.grad = None
        cross_entropy(model(Tensor(x[shard])), y[shard]).backward()  # closed: gradients in arrays of their own
        detached = not any(np.shares_memory(p.grad.data, b.buffer) for p in model.parameters() for b in ddp.buckets)
        return synced, written, in_buckets, detached

    for synced, written, in_buckets, detached in run_ranks(2, body):
        assert written == {"0.weight": True, "0.bias": True, "2.gain": False, "3.weight": True, "3.bias": True}
        assert in_buckets and detached
        for name in expected:
            np.testing.assert_allclose(synced[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("cap_mb", [25.0, 1e-9])
def test_conv_gradients_are_written_into_their_buckets(cap_mb):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 16)

    def build():
        distbp.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))

    reference = build()
    cross_entropy(reference(Tensor(x)), y).backward()
    expected = _grads(reference)

    def body(comm):
        model = build()
        ddp = DataParallel(model, comm, bucket_cap_mb=cap_mb)
        shard = slice(comm.rank * 8, (comm.rank + 1) * 8)
        written = _steps_noting_gradients_written_in_buckets(model, ddp, x[shard], y[shard])
        shared = {n: any(np.shares_memory(p.grad.data, b.buffer) for b in ddp.buckets)
                  for n, p in model.named_parameters()}
        synced = _grads(model)
        ddp.close()
        return synced, written, shared

    for synced, written, shared in run_ranks(2, body):
        assert written == [{n: True for n in expected}] * 2
        assert all(shared.values())
        for name in expected:
            np.testing.assert_allclose(synced[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("widths", [(8, 16, 16, 4), (8, 600, 600, 4)])
def test_average_false_sums_and_a_scaled_loss_makes_that_the_mean(widths):
    x, y = _data()
    reference = _mlp(widths=widths)
    cross_entropy(reference(Tensor(x)), y).backward()
    mean = _grads(reference)

    def body(comm, scale):
        model = _mlp(widths=widths)
        ddp = DataParallel(model, comm, average=False)
        shard = slice(comm.rank * 32, (comm.rank + 1) * 32)
        (cross_entropy(ddp(Tensor(x[shard])), y[shard]) * scale).backward()
        ddp.synchronize()
        return _grads(model)

    for grads in run_ranks(2, lambda comm: body(comm, 1.0)):  # the sum of two half-batch means
        for name in mean:
            np.testing.assert_allclose(grads[name], 2 * mean[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for grads in run_ranks(2, lambda comm: body(comm, 0.5)):
        for name in mean:
            assert grads[name].dtype == np.float32
            np.testing.assert_allclose(grads[name], mean[name], rtol=1e-5, atol=1e-7, err_msg=name)



def test_thread_ranks_load_the_data_once_and_share_it_read_only(monkeypatch):
    # each rank used to load its own copy: 500 ranks took 42 s before the first step
    from distbp.train import launch, trainer

    loads, shared = [], []
    real_build = trainer.build_data

    def counting(config):
        loads.append(1)
        return real_build(config)

    real_init = trainer.Trainer.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        shared.append(self.split)

    monkeypatch.setattr(launch, "build_data", counting)
    monkeypatch.setattr(trainer, "build_data", counting)
    monkeypatch.setattr(trainer.Trainer, "__init__", recording)
    launch.run(make_config({"backend": "threads", "world_size": 3, "max_steps": 2, "progress": "none"}))
    assert len(loads) == 1 and len(shared) == 3 and all(s is shared[0] for s in shared)
    assert not shared[0].train.x.flags.writeable and not shared[0].test.y.flags.writeable


def _spans(path):
    return [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]


def test_the_trace_draws_well_formed_rows_on_one_clock_labelled_with_the_runs_steps(tmp_path):
    # each bucket's all-reduce on a row no other in-flight one shares (they overlapped on one row, which
    # Perfetto draws wrongly); spans that do not overlap by rounding; one origin for every rank; steps of
    # the run (a resumed one counted from 0); written once the traced steps are done
    ckpt, path = tmp_path / "c.ckpt", tmp_path / "t.json"
    _train_ranks(2, epochs=2, max_steps=5, checkpoint=str(ckpt), bucket_cap_mb=1e-4)
    _train_ranks(2, epochs=2, max_steps=12, checkpoint=str(ckpt), resume=True, bucket_cap_mb=1e-4, trace=str(path))
    spans = _spans(path)
    assert {e["args"]["step"] for e in spans} == set(range(6, 13))
    rows = {}
    for e in spans:
        rows.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    assert any(tid > 1 for _, tid in rows)  # tiny buckets in flight together: more than one all-reduce row
    for row in rows.values():
        row.sort()
        assert all(end <= start for (_, end), (start, _) in zip(row, row[1:])), row  # no partial overlaps
    firsts = [min(e["ts"] for e in spans if e["pid"] == rank and e["name"] == "forward") for rank in (0, 1)]
    assert abs(firsts[0] - firsts[1]) < 50_000  # the same step on one clock (each rank began at 0 before)


def test_the_trace_is_written_once_its_steps_are_traced_so_a_run_stopped_later_keeps_it(tmp_path, monkeypatch):
    from distbp.train import trace

    path, stopped = tmp_path / "t.json", {}
    real_write = trace.write_trace

    def write_then_stop(p, events):
        real_write(p, events)
        stopped["written"] = True
        raise KeyboardInterrupt  # as if the run were stopped after its traced steps

    monkeypatch.setattr("distbp.train.trainer.write_trace", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_config({"epochs": 3, "trace": str(path), "progress": "none"})).fit()  # 135 steps
    assert stopped and {e["args"]["step"] for e in _spans(path)} == set(range(1, 51))


def test_a_resumed_run_drops_the_records_its_checkpoint_does_not_cover(tmp_path):
    # killed at step 33 with a checkpoint at 20: the record of step 30 was written twice
    from distbp.train.progress import read_metrics

    ckpt, metrics = str(tmp_path / "c.ckpt"), tmp_path / "m.jsonl"
    base = dict(epochs=1, checkpoint=ckpt, metrics=str(metrics), eval_every=10, checkpoint_every=20)
    _train_ranks(1, **base, max_steps=20)
    with open(metrics, "a") as fh:  # what the killed run recorded after its last checkpoint
        fh.write(json.dumps({"step": 30, "train_loss": 9.0}) + "\n")
    _train_ranks(1, **base, max_steps=40, resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [10, 20, 30, 40] and read_metrics(metrics)[2]["train_loss"] != 9.0


def test_resuming_keeps_a_symlinked_metrics_file_a_link_and_a_finished_run_keeps_its_trace(tmp_path):
    ckpt, real, link, trace = tmp_path / "c.ckpt", tmp_path / "real.jsonl", tmp_path / "link.jsonl", tmp_path / "t.json"
    link.symlink_to(real)
    base = dict(epochs=1, checkpoint=str(ckpt), metrics=str(link), eval_every=10, checkpoint_every=20)
    _train_ranks(1, **base, max_steps=20, trace=str(trace))
    with open(link, "a") as fh:
        fh.write(json.dumps({"step": 30, "train_loss": 9.0}) + "\n")
    _train_ranks(1, **base, max_steps=40, resume=True)
    assert link.is_symlink() and [json.loads(line)["step"] for line in real.read_text().splitlines()] == [10, 20, 30, 40]
    spans = len(_spans(trace))
    _train_ranks(1, **base, max_steps=40, resume=True, trace=str(trace))  # nothing left to train
    assert len(_spans(trace)) == spans  # it was replaced by a trace of no step


def _threads_settle(before, seconds=5.0):
    import gc

    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if threading.active_count() <= before or time.monotonic() > deadline:
            return threading.active_count()
        time.sleep(0.05)


def test_thread_communicators_dropped_without_close_end_their_threads():
    before = threading.active_count()
    for _ in range(20):
        comms = ThreadGroup(2).communicators()
        comms[0].dup()
    del comms
    assert _threads_settle(before) <= before


def test_a_run_that_fails_gives_back_its_data_parallel_wrapper():
    # a program that goes on after a failed fit() must be able to train again; the buckets of MPI's shared
    # memory (at most 512 in a process) were pinned by each failed run
    trainer = Trainer(make_config(dict(lr=1e300, max_steps=1, progress="none")), step=AllReduceStep(LocalCommunicator()))
    with pytest.raises(FloatingPointError, match="test loss became nan"):
        trainer.fit()
    assert getattr(trainer.model, "_data_parallel", None) is None


def test_a_rank_may_end_with_collectives_of_a_copy_still_queued():
    # a DataParallel never closed leaves its buckets' all-reduces on its copy of the communicator: the
    # rank's end closed only its own communicator, and a peer reaching one of those collectives took the
    # rank for gone (an error no rank's program raised: run_ranks itself then failed, with StopIteration)
    def body(comm):
        copy = comm.dup()
        for _ in range(5):
            copy.iallreduce(np.ones(1000, np.float32))  # never waited for
        return comm.rank

    for _ in range(50):
        assert run_ranks(2, body, timeout=20) == [0, 1]


def test_ranks_that_each_make_the_groups_communicators_and_keep_their_own_go_on():
    # each thread dropped the other ranks' communicator objects at once, and their finalizers said those
    # ranks had left: the peers' collectives failed ("closed their communicator without entering it")
    import gc

    group, sums = ThreadGroup(2, timeout=20), [None, None]

    def body(rank):
        comm = group.communicators()[rank]
        gc.collect()
        if rank == 1:
            time.sleep(0.3)
        values = np.full(3, rank + 1.0, np.float32)
        comm.allreduce(values)
        sums[rank] = float(values[0])

    threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sums == [3.0, 3.0]


def test_a_communicator_of_ones_own_without_dup_is_named():
    class Mine(LocalCommunicator):
        dup = distbp.comm.Communicator.dup

    with pytest.raises(NotImplementedError, match="Mine has no dup\\(\\), which DataParallel needs"):
        DataParallel(_mlp(), Mine())


def test_the_error_of_a_rank_that_closed_its_copies_on_the_way_out_is_the_one_reported():
    # a failing fit() closes its DataParallel's copy of the communicator before run_ranks aborts the group: a
    # peer waiting in the copy failed first ("closed their communicator"), and was reported instead
    def body(comm):
        copy = comm.dup()
        if comm.rank == 0:
            copy.allreduce(np.ones(3, np.float32))
        copy.close()
        time.sleep(0.3)  # the peer's collective fails meanwhile
        raise ValueError("rank 1's own error")

    with pytest.raises(RankFailed, match="rank 1 failed: ValueError: rank 1's own error"):
        run_ranks(2, body, timeout=20)
