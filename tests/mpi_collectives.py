"""Run under mpiexec by test_mpi.py: the MPI communicator's all-reduces, shared-memory and MPI, checked.

Prints one line "shared_memory=<bool> buffers_shared=<n> segments_left=<n> ok" from rank 0 when every
check holds, preceded by "fallback: <why>" when a shared buffer could not be made; raises (a non-zero
exit) on the first check that fails. An argument injects a failure in making the shared segments:
  fail-create  rank 0 cannot reserve the segment (as when /dev/shm is full)
  fail-map     the last rank cannot map it
  limit-3      at most 3 shared buffers: the later ones are plain arrays, reduced by MPI
Two more arguments run a scenario of their own instead:
  sizes-differ rank 0 asks for a buffer of another size than the others: refused on every rank
  late         rank 1 reaches buffer() after the timeout: rank 0 times out, and no file is left behind
  mixed        rank 0 all-reduces a shared buffer, rank 1 a plain array: both time out naming the mismatch
  late-allreduce  rank 1 reaches a matching shared all-reduce after rank 0's timeout: rank 0 names it late
  checked-<case>  with check_collectives, rank 1 makes another call than rank 0 (case: size, dtype, op,
                  kind, root, shared): every rank stops naming the difference
  many-communicators  1100 communicators in turn, each all-reducing float16
  late-dataparallel  rank 1 builds its DataParallel after the timeout: rank 0 times out naming it
  dataparallel  DataParallel with allow_unused, a loss all-reduced on the same communicator between backward
                and synchronize(), then a wrapper that failed (a second backward) closed and the model
                wrapped again: prints "dataparallel ok" from rank 0
"""

import os
import sys
import time

import numpy as np

from distbp.comm import CollectiveTimeout, mpi_communicator


def expected_sum(size, n, dtype, salt):
    return sum(np.arange(n, dtype=np.float64) * (r + 1) + salt for r in range(size)).astype(dtype)


def inject(kind, rank, size):
    import errno

    from distbp.comm import mpi_shm

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def cannot_map(fd, length):
        raise OSError(errno.ENOMEM, "Cannot allocate memory (injected)")

    if kind == "limit-3":
        from distbp.comm import mpi

        mpi._MAX_SHARED_BUFFERS = 3
    if kind == "fail-create" and rank == 0:
        mpi_shm.os.posix_fallocate = no_space
    if kind == "fail-map" and rank == size - 1:
        mpi_shm.mmap = type("mmap", (), {"mmap": staticmethod(cannot_map)})


def scenario(kind, comm):
    rank = comm.rank
    if rank == 0:
        print(f"creator {os.getpid()}", flush=True)
    if kind == "sizes-differ":
        try:
            comm.buffer(1000 if rank == 0 else 2000)
        except ValueError as e:
            assert "different sizes" in str(e), e
            print(f"rank {rank} refused: {e}", flush=True)
        comm.barrier()
        return 0
    if kind == "late":
        comm.timeout = 2.0
        if rank == 1:
            time.sleep(3.0)
        try:
            comm.buffer(1000)
            outcome = "made"
        except CollectiveTimeout as e:
            outcome = f"timed out: {e}"
        except OSError as e:  # a late rank finds the file already gone
            outcome = f"gave up: {e}"
        print(f"rank {rank} {outcome}", flush=True)
        time.sleep(3.0)  # every rank past buffer() before the test looks in /dev/shm
        os._exit(0)  # the group is out of step after a timeout: no MPI_Finalize
    if kind == "late-allreduce":
        shared = comm.buffer(1000)  # rank 0 stops advancing it once it timed out: rank 1 then waits, and answers
        comm.timeout = 2.0
        if rank == 1:
            time.sleep(2.5)
        try:
            comm.allreduce(shared)
            outcome = "completed"
        except CollectiveTimeout as e:
            outcome = f"timed out: {e}"
        print(f"rank {rank} {outcome}", flush=True)
        time.sleep(3.0)  # rank 0 past its grace period before either leaves
        os._exit(0)  # out of step after a timeout: no MPI_Finalize
    if kind == "mixed":
        shared = comm.buffer(1000)
        assert comm.is_shared(shared)
        comm.timeout = 2.0
        try:
            comm.allreduce(shared if rank == 0 else np.zeros(1000, np.float32))
            outcome = "completed"
        except CollectiveTimeout as e:
            outcome = f"timed out: {e}"
        print(f"rank {rank} {outcome}", flush=True)
        time.sleep(1.0)  # both ranks past their timeout before either leaves
        os._exit(0)  # out of step after a timeout: no MPI_Finalize


def checked(case, comm):
    """Rank 0 all-reduces 8 float32 values (a sum); rank 1 makes the call `case` changes."""
    from distbp.comm import CommError

    comm.check_collectives = True
    shared = comm.buffer(8)
    plain = np.ones(8, np.float32)
    other = {"size": lambda: comm.allreduce(np.ones(9, np.float32)),
             "dtype": lambda: comm.allreduce(np.ones(8, np.float64)),
             "op": lambda: comm.allreduce(plain, "mean"),
             "kind": comm.barrier,
             "root": lambda: comm.broadcast(plain, root=1),
             "shared": lambda: comm.allreduce(shared)}[case]
    call = (lambda: comm.broadcast(plain, root=0)) if case == "root" else (lambda: comm.allreduce(plain))
    try:
        (call if comm.rank == 0 else other)()
        outcome = "completed"
    except CommError as e:
        outcome = f"refused: {e}"
    print(f"rank {comm.rank} {outcome}", flush=True)
    comm.allreduce(np.ones(2, np.float32))  # the check's own exchange matched: the ranks are in step after it
    return 0


def many_communicators(comm):
    # each once made its own float16 operator: MPI refused the 33rd; and close() did not free its MPI
    # communicators, of which MPI has about a thousand
    for i in range(1100):
        other = mpi_communicator(timeout=20)
        half = np.full(5, other.rank + 1.5, np.float16)
        other.allreduce(half)
        assert (half == sum(r + 1.5 for r in range(other.size))).all(), (i, half)
        other.close()
    if comm.rank == 0:
        print("1100 communicators ok", flush=True)
    return 0


def dataparallel(comm):
    import distbp
    from distbp.autograd import Tensor
    from distbp.comm import LocalCommunicator
    from distbp.parallel import DataParallel
    from two_heads import TwoHeads

    def step(c, rank):
        # `extra` used on the last rank only: the other ranks start its bucket in synchronize(), it in backward
        distbp.manual_seed(0)
        model = TwoHeads()
        ddp = DataParallel(model, c, allow_unused=True, bucket_cap_mb=1e-9)
        loss = ddp(Tensor(np.ones((3, 4), np.float32) * (rank + 1)), rank == comm.size - 1)
        loss.backward()
        total = np.array([loss.item()], np.float32)
        c.allreduce(total)
        ddp.synchronize()
        ddp.close()
        return total[0], {n: p.grad.data for n, p in model.named_parameters() if p.grad is not None}

    total, grads = step(comm, comm.rank)
    alone = [step(LocalCommunicator(), r) for r in range(comm.size)]
    assert abs(total - sum(t for t, _ in alone)) <= 1e-5 * abs(total), (total, [t for t, _ in alone])
    for name, g in grads.items():
        np.testing.assert_allclose(g, sum(a[1].get(name, 0) for a in alone) / comm.size, rtol=1e-5, err_msg=name)
    distbp.manual_seed(0)
    model = TwoHeads()
    ddp = DataParallel(model, comm, bucket_cap_mb=1e-9)
    x = Tensor(np.ones((3, 4), np.float32))
    ddp(x, True).backward()
    try:
        ddp(x, True).backward()
        raise AssertionError("a second backward before synchronize() was accepted")
    except RuntimeError as e:
        assert "second gradient" in str(e), e
    ddp.close()
    ddp = DataParallel(model, comm)  # the failed one gave everything back
    model.zero_grad()
    ddp(x, True).backward()
    ddp.synchronize()
    ddp.close()
    copy = comm.dup()  # a copy's copy works on once the copy it was made from is closed, as MPI_Comm_dup's
    other = copy.dup()
    copy.close()
    shared = other.buffer(8)
    shared[...] = 1
    other.allreduce(shared)
    assert (shared == comm.size).all(), shared
    other.close()
    comm.barrier()
    if comm.rank == 0:
        print("dataparallel ok", flush=True)
    return 0


def late_dataparallel(comm):
    # MPI_Comm_dup, which DataParallel's copy of the communicator needs, blocks in C past any timeout
    from distbp.models import mlp
    from distbp.parallel import DataParallel

    comm.timeout = 2.0
    if comm.rank == 1:
        time.sleep(6.0)
    try:
        DataParallel(mlp((8,), 2, (4,)), comm)
        outcome = "wrapped"
    except CollectiveTimeout as e:
        outcome = f"timed out: {e}"
    print(f"rank {comm.rank} {outcome}", flush=True)
    os._exit(0)  # the group is out of step after a timeout: no MPI_Finalize


def main():
    comm = mpi_communicator(timeout=20)
    rank, size = comm.rank, comm.size
    if len(sys.argv) > 1 and sys.argv[1] == "dataparallel":
        return dataparallel(comm)
    if len(sys.argv) > 1 and sys.argv[1] == "late-dataparallel":
        return late_dataparallel(comm)
    if len(sys.argv) > 1 and sys.argv[1] in ("sizes-differ", "late", "mixed", "late-allreduce"):
        return scenario(sys.argv[1], comm)
    if len(sys.argv) > 1 and sys.argv[1].startswith("checked-"):
        return checked(sys.argv[1][len("checked-"):], comm)
    if len(sys.argv) > 1 and sys.argv[1] == "many-communicators":
        return many_communicators(comm)
    if len(sys.argv) > 1:
        inject(sys.argv[1], rank, size)
    buffers = []
    # sizes smaller than the number of ranks, not a multiple of a cache line, and large
    for n, dtype in [(1, np.float32), (2, np.float32), (17, np.float64), (1000, np.float32),
                     (1_000_003, np.float32)]:
        b = comm.buffer(n, dtype)
        assert b.shape == (n,) and b.dtype == dtype and not b.any(), "a buffer starts zeroed"
        buffers.append(b)
    shared = [b for b in buffers if comm.is_shared(b)]
    for step in range(3):  # the same memory reduced again and again, as DataParallel's buckets
        handles = []
        for i, b in enumerate(buffers):
            b[...] = np.arange(b.size) * (rank + 1) + step + i
            handles.append(comm.iallreduce(b, "sum"))
        plain = np.full(5, float(rank), np.float32)  # an ordinary array in between: MPI's own all-reduce
        comm.allreduce(plain, "mean")
        np.testing.assert_allclose(plain, np.full(5, (size - 1) / 2))
        for h in reversed(handles):  # progress on some, in any order
            h.test()
        for h in handles:
            h.wait()
            h.wait()  # waiting twice is harmless
        for i, b in enumerate(buffers):
            np.testing.assert_allclose(b, expected_sum(size, b.size, b.dtype, step + i), rtol=1e-6,
                                       err_msg=f"buffer {i} step {step}")
        digests = comm.allgather([b.tobytes() for b in buffers])
        assert all(d == digests[0] for d in digests), "every rank ends with the same bits"
    # Completion in opposite orders on odd and even ranks, with nothing polled before: each wait must
    # advance the other all-reduces in flight, or both ranks would wait for each other until the timeout.
    x, y = buffers[3], buffers[4]
    x[...], y[...] = rank, 2 * rank
    hx, hy = comm.iallreduce(x), comm.iallreduce(y)
    for h in (hx, hy) if rank % 2 == 0 else (hy, hx):
        h.wait()
    assert (x == size * (size - 1) / 2).all() and (y == size * (size - 1)).all(), f"rank {rank}: opposite orders"
    # A blocking collective before the wait on some ranks, after it on the others.
    x[...] = 1
    hx = comm.iallreduce(x)
    if rank % 2 == 0:
        comm.barrier()
    hx.wait()
    if rank % 2 == 1:
        comm.barrier()
    assert (x == size).all(), f"rank {rank}: barrier between"

    # Ranks that advance in-flight all-reduces at different moments (DataParallel's hooks test() them):
    # here rank 0 launches the second buffer late, while the others push the first one on meanwhile.
    first, second = buffers[3], buffers[4]
    first[...] = rank + 1
    pending = comm.iallreduce(first)
    if rank == 0:
        time.sleep(0.3)
    else:
        start = time.monotonic()
        while time.monotonic() - start < 0.2:
            pending.test()
    second[...] = rank + 1
    later = comm.iallreduce(second)
    if rank == 0:
        time.sleep(0.1)
    pending.wait()
    total = size * (size + 1) / 2
    assert (first == total).all(), f"rank {rank}: the first buffer is not complete when its wait returns"
    if any(b is second for b in shared):  # two all-reduces of one shared buffer at once: refused
        try:
            comm.iallreduce(second)
        except RuntimeError as e:
            assert "still being all-reduced" in str(e)
        else:
            raise AssertionError(f"rank {rank}: a second all-reduce of a shared buffer in flight was allowed")
    later.wait()
    assert (second == total).all(), f"rank {rank}: the second buffer"
    b = buffers[3]
    b[...] = rank
    comm.iallreduce(b, "mean").wait()
    np.testing.assert_allclose(b, np.full(b.size, (size - 1) / 2))
    # A released buffer keeps its values and is all-reduced by MPI from then on; a new one is shared again.
    released = buffers[2]
    comm.release(released)
    assert not comm.is_shared(released)
    released[...] = 1
    comm.allreduce(released)
    assert (released == size).all(), f"rank {rank}: a released buffer"
    again = comm.buffer(17, np.float64)
    assert comm.is_shared(again) == bool(shared), f"rank {rank}: a buffer after a release"
    comm.barrier()
    creator = comm.allgather(os.getpid())[0]  # segments are named after rank 0's process
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"distbp-{creator}-")]
    if rank == 0:
        if comm.shared_memory_error:
            print(f"fallback: {comm.shared_memory_error}", flush=True)
        print(f"shared_memory={comm.shared_memory} buffers_shared={len(shared)} "
              f"segments_left={len(leftovers)} ok", flush=True)
    comm.close()


if __name__ == "__main__":
    sys.exit(main())
