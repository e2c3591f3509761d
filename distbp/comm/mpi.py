"""MPI through mpi4py's buffer methods: contiguous numpy arrays go to MPI directly, never pickled.

Between ranks that all run on one machine, buffers from `buffer()` live in shared memory and are
all-reduced there (mpi_shm.py), without going through MPI's own copies; DISTBP_MPI_SHM=0 turns that off.

Every collective is started non-blocking and completed by polling, so that one which does not complete
within the timeout can end the job naming the ranks that never reached it. Those are found only then, at
no cost to the collectives that do complete: the rank that timed out asks every peer over a second
communicator which collective it is waiting in; a rank waiting in a collective answers from its polling
loop, and a rank that is not (computing, hung, gone) does not answer.
"""

import os
import pickle
import time

import numpy as np

from .base import (
    DEFAULT_TIMEOUT, CollectiveTimeout, CommError, Communicator, Handle, check_buffer, check_op, check_root,
)
from .mpi_shm import SHM_DIR, SharedBuffer, create_segment

_QUERY, _REPLY = 7, 8
_COLLECTIVES = ("allreduce", "broadcast", "allgather", "barrier")  # answered as an index
_YIELD_EVERY = 64  # polls between offers of the core to another runnable process (a no-op if none)
_ANSWER_EVERY = 1024  # polls between looks for a peer's question (about a millisecond)
# Each shared buffer has an MPI communicator of its own, and MPICH has about 2,000 per process: past
# this many live in the process (a tiny bucket cap on a large model), more are plain arrays reduced by MPI.
_MAX_SHARED_BUFFERS = 512
_live_shared_buffers = 0


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the mpi backend needs mpi4py and an MPI library: pip install mpi4py mpich "
            f"(or build mpi4py against your cluster's MPI) [{e}]"
        ) from None
    return MPI


# MPICH keeps the name of a shared-memory segment (2 MB, in /dev/shm: memory) until MPI_Finalize, so every
# job that ends in MPI_Abort or a killed rank used to leave one behind. Once every rank of the machine has
# it mapped, nobody opens it by name again: the name goes at start-up, and at an abort whatever MPICH
# named since goes too. (MPICH's own unlink at MPI_Finalize tolerates the name being gone.)
_MPICH_SEGMENT = SHM_DIR + "/mpich_shm_"


def mpich_segments():
    """The MPICH shared-memory segments this process maps that still have a name in /dev/shm."""
    try:
        with open("/proc/self/maps", "rb") as maps:  # bytes: another mapped file's name may not be UTF-8
            lines = maps.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:  # not Linux
        return []
    return sorted({line.split(None, 5)[5] for line in lines
                   if _MPICH_SEGMENT in line and not line.endswith("(deleted)") and len(line.split(None, 5)) == 6})


def remove_names(paths):
    for path in paths:
        try:
            os.unlink(path)
        except OSError:  # gone already (another rank), or not ours to remove
            pass


def _half_sum(inbuf, inoutbuf, datatype):
    # float16 travels as 16-bit integers (MPI has no half type); this operator adds them as halves
    a = np.frombuffer(inbuf, dtype=np.float16)
    b = np.frombuffer(inoutbuf, dtype=np.float16)
    b += a


_half_sum_op = None  # one per process: MPI allows only a few dozen user-defined operators


def half_sum_op(MPI):
    global _half_sum_op
    if _half_sum_op is None:
        _half_sum_op = MPI.Op.Create(_half_sum, commute=True)
    return _half_sum_op


class _MPIHandle(Handle):
    def __init__(self, comm, request, name, seq, after=None):
        self.comm, self.request, self.name, self.seq, self.after = comm, request, name, seq, after
        self._done = False

    def test(self):
        if not self._done and self.request.Test():
            self._finish()
        return self._done

    def _finish(self):
        if self.after is not None:
            self.after()  # done only once it has run: a failure here is raised again by the next wait()
        self._done = True

    def wait(self):
        if not self._done:
            _complete(self.comm, self.request.Test, self.seq, self.name)
            self._finish()


def _complete(comm, done, seq, name):
    """Poll `done()` until it is true, for collective #seq; past the communicator's timeout, name who is
    missing. Every poll also advances the shared-memory all-reduces in flight: they move only when
    polled, and a peer may need one of them to progress before it can reach this collective."""
    # Poll without sleeping: MPICH advances a non-blocking collective only inside MPI calls, so a
    # sleeping rank would stall the transfer for every rank (MPI_Wait spins the same way).
    deadline = None if comm.timeout is None else time.monotonic() + comm.timeout
    in_flight = _in_flight
    polls = 0
    while not done():
        if in_flight:
            for handle in in_flight[:]:  # a completed one leaves the list
                handle.test()
        polls += 1
        if polls % _YIELD_EVERY == 0:
            os.sched_yield()  # more ranks than cores: let a peer that still computes have this core
        if polls % _ANSWER_EVERY == 0:
            comm._answer_peers(seq, name)
            if deadline is not None and time.monotonic() > deadline:
                comm._timed_out(name, seq)


class _SharedAllreduce(Handle):
    """An all-reduce in shared memory: barrier (every buffer final), each rank reduces its slice into every
    buffer, barrier (every slice written). It advances only when polled: by its test(), its wait(), or
    any wait of the same communicator (which polls every shared all-reduce in flight).

    Barriers match by their order on a communicator, and ranks advance in-flight all-reduces at different
    moments, so each shared buffer has a communicator of its own: its barriers then alternate between
    the two kinds in the same order on every rank, whatever the other buffers do."""

    def __init__(self, comm, shared, seq, after=None):
        shared.in_flight = True
        self.comm, self.shared, self.seq, self.after = comm, shared, seq, after
        self.request = shared.barriers.Ibarrier()
        self.phase = 0  # 0: waiting for every buffer; 1: for every slice; 2: done
        _in_flight.append(self)

    def test(self):
        """Advance as far as possible without waiting; True once done."""
        while self.phase < 2:
            if not self.request.Test():
                return False
            if self.phase == 0:
                self.shared.reduce_my_slice()
                self.request = self.shared.barriers.Ibarrier()
                self.phase = 1
            else:
                self.request = None
                self.phase = 2
                self.shared.in_flight = False
                _in_flight.remove(self)
                if self.after is not None:
                    self.after()
        return True

    def wait(self):
        if self.phase < 2:
            _complete(self.comm, self.test, self.seq, "allreduce")


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT, shared_memory=None, check_collectives=None):
        """shared_memory: all-reduce `buffer()`s in memory shared by the ranks when they all run on one
        machine (default: yes, unless the environment has DISTBP_MPI_SHM=0).

        check_collectives: before every collective, the ranks compare what they are about to do (which
        collective, buffer size and dtype, op, root) and all stop naming the first difference. MPI itself
        does not check: mismatched calls give garbage, a crash or a hang. It costs one small blocking
        exchange per collective (so an all-reduce no longer overlaps what follows its start): a debugging
        aid, off unless the environment has DISTBP_CHECK_COLLECTIVES=1."""
        super().__init__(timeout)
        MPI = self.MPI = _mpi()
        base = comm if comm is not None else MPI.COMM_WORLD
        self.comm = base.Dup()
        self._control = base.Dup()  # questions and answers about who waits where (see the module's doc)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._seq = 0
        self._sends = []  # (request, buffer) of questions and answers not known to be delivered
        self._asked = {}  # peer -> (collective #, its index) of the last question it asked: it timed out there
        if check_collectives is None:
            check_collectives = os.environ.get("DISTBP_CHECK_COLLECTIVES", "0") not in ("", "0")
        self.check_collectives = False  # until the ranks agree (below): a check on some ranks only pairs with
        # their peers' real collectives
        if shared_memory is None:
            shared_memory = os.environ.get("DISTBP_MPI_SHM", "1") != "0"
        node = base.Split_type(MPI.COMM_TYPE_SHARED)
        one_machine = node.Get_size() == self.size
        # the segments every rank of this machine has mapped (lists made before any rank returns from here)
        mapped = [set(names) for names in node.allgather(mpich_segments())]
        if node.Get_rank() == 0:
            remove_names(sorted(set.intersection(*mapped)))
        node.Free()
        can = bool(shared_memory) and one_machine and self.size > 1 and os.path.isdir(SHM_DIR)
        answers = self.allgather((can, bool(check_collectives)))
        self.shared_memory = all(a for a, _ in answers)  # the same answer on every rank, or none uses it
        self.check_collectives = any(c for _, c in answers)  # asked for on one rank: on for all
        self.shared_memory_error = None  # why a buffer() could not be shared, if one could not
        self._shared = {}  # (address, size, dtype) of each shared buffer handed out -> its SharedBuffer
        self._closed = False

    # --- finding the ranks that did not arrive ---

    def _arrive(self, name=None, array=None, detail=0):
        """The next collective's number; with check_collectives, first compare the call with every rank's."""
        self._seq += 1
        if self.check_collectives and name is not None:
            self._check_same_call(name, array, detail)
        return self._seq

    def _check_same_call(self, name, array, detail):
        shared = array is not None and _key(array) in self._shared
        mine = np.array([_COLLECTIVES.index(name), -1 if array is None else array.size,
                         -1 if array is None else _DTYPE_CODES.get(array.dtype.str, 0), detail, shared], np.int64)
        everyone = np.zeros((self.size, mine.size), np.int64)
        _MPIHandle(self, self.comm.Iallgather(mine, everyone), name, self._seq).wait()
        for rank in range(1, self.size):
            if (everyone[rank] != everyone[0]).any():
                raise CommError(f"collective #{self._seq}: rank {rank} calls {_describe_call(everyone[rank])} but "
                                f"rank 0 {_describe_call(everyone[0])}; every rank must make the same calls "
                                "in the same order")

    def _send(self, values, dest, tag):
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        buffer = np.array(values, np.int64)
        self._sends.append((self._control.Isend(buffer, dest=dest, tag=tag), buffer))

    def _answer_peers(self, seq, name):
        """Tell every peer that asked that this rank waits in collective #seq, a `name`."""
        status, question = self.MPI.Status(), np.zeros(2, np.int64)
        while self._control.Iprobe(source=self.MPI.ANY_SOURCE, tag=_QUERY, status=status):
            source = status.Get_source()
            self._control.Recv(question, source=source, tag=_QUERY)
            self._asked[source] = (int(question[0]), int(question[1]))
            self._send([seq, _COLLECTIVES.index(name)], source, _REPLY)

    def _timed_out(self, name, seq):
        status, answer = self.MPI.Status(), np.zeros(2, np.int64)
        while self._control.Iprobe(source=self.MPI.ANY_SOURCE, tag=_REPLY, status=status):
            self._control.Recv(answer, source=status.Get_source(), tag=_REPLY)  # late answers to an earlier question
        for peer in range(self.size):
            if peer != self.rank:
                self._send([seq, _COLLECTIVES.index(name)], peer, _QUERY)
        waiting = {}  # peer -> (collective #, its name) it waits in
        here = (seq, _COLLECTIVES.index(name))
        peers = [r for r in range(self.size) if r != self.rank]
        stuck = lambda: [r for r in peers if self._asked.get(r) == here]  # noqa: E731 -- timed out here too
        grace = time.monotonic() + min(2.0, max(self.timeout, 0.1))
        # until every peer has answered us and asked us in turn: a peer timing out a moment later gets
        # its answer from us too
        while time.monotonic() < grace and (len(waiting) < len(peers) or len(stuck()) < len(peers)):
            self._answer_peers(seq, name)
            if self._control.Iprobe(source=self.MPI.ANY_SOURCE, tag=_REPLY, status=status):
                source = status.Get_source()
                self._control.Recv(answer, source=source, tag=_REPLY)
                waiting[source] = (int(answer[0]), _COLLECTIVES[int(answer[1])])
            else:
                time.sleep(0.001)
        missing = [r for r in peers if waiting.get(r) != (seq, name)]
        if not missing:
            late = [r for r in peers if r not in stuck()]
            mismatch = ("the ranks called it with arguments that do not match (an all-reduce of a comm.buffer() "
                        "array on some ranks and of another array on others, or different sizes, dtypes or ops)")
            if late:  # they wait in it now, but may just have come late
                raise CollectiveTimeout(
                    f"rank {self.rank}: {name} (collective #{seq}) did not complete within {self.timeout:g} s; "
                    f"rank(s) {late} reached it only after that, or {mismatch}")
            raise CollectiveTimeout(
                f"rank {self.rank}: {name} (collective #{seq}) did not complete within {self.timeout:g} s, "
                f"though every rank has waited in it as long: {mismatch}")
        elsewhere = "".join(f"; rank {r} waits in {waiting[r][1]} (collective #{waiting[r][0]})"
                            for r in missing if r in waiting)
        raise CollectiveTimeout(
            f"rank {self.rank}: {name} (collective #{seq}) did not complete within {self.timeout:g} s; "
            f"rank(s) {missing or 'unknown'} did not arrive{elsewhere}"
        )

    # --- collectives ---

    def buffer(self, size, dtype=np.float32):
        global _live_shared_buffers
        dtype = np.dtype(dtype)
        if (not self.shared_memory or dtype.kind != "f" or dtype.itemsize < 4
                or _live_shared_buffers >= _MAX_SHARED_BUFFERS):
            return super().buffer(size, dtype)
        segment, error = create_segment(self, size * dtype.itemsize)
        if segment is None:  # e.g. /dev/shm is full: the same buffer, reduced by MPI instead
            self.shared_memory_error = error
            return super().buffer(size, dtype)
        shared = SharedBuffer(segment, size, dtype, self.rank, self.size)
        shared.barriers = self.comm.Dup()  # every rank is here (create_segment gathered them all)
        self._shared[_key(shared.mine)] = shared
        _live_shared_buffers += 1
        return shared.mine

    def is_shared(self, array):
        """Whether `array` is a buffer() that this communicator all-reduces in shared memory."""
        return _key(array) in self._shared

    def release(self, array):
        """Give back a buffer() that will not be all-reduced again (collective, like buffer()). The array
        stays valid memory; it is simply no longer shared with the other ranks."""
        global _live_shared_buffers
        shared = self._shared.get(_key(array))
        if shared is None:
            return
        if shared.in_flight:
            raise RuntimeError("release: this buffer is still being all-reduced; wait() for that first")
        del self._shared[_key(array)]
        shared.barriers.Free()
        shared.others = []  # this rank no longer writes into the other ranks' copies
        _live_shared_buffers -= 1

    def iallreduce(self, array, op="sum"):
        check_buffer(array, "allreduce")
        check_op(op, array)
        shared = self._shared.get(_key(array)) if self._shared else None
        if shared is not None and shared.in_flight:
            raise RuntimeError("allreduce: this buffer is still being all-reduced; wait() for that first")
        seq = self._arrive("allreduce", array, _OPS.index(op))
        MPI = self.MPI
        after = None
        if op == "mean":
            size = self.size

            def after():
                array[...] /= size

        if shared is not None:
            return _SharedAllreduce(self, shared, seq, after)
        if array.dtype == np.float16:
            request = self.comm.Iallreduce(MPI.IN_PLACE, [array.view(np.int16), MPI.SHORT], op=half_sum_op(MPI))
        else:
            request = self.comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return _MPIHandle(self, request, "allreduce", seq, after)

    def broadcast(self, array, root=0):
        check_buffer(array, "broadcast")
        root = check_root(root, self.size)
        seq = self._arrive("broadcast", array, root)
        _MPIHandle(self, self.comm.Ibcast(array, root=root), "broadcast", seq).wait()

    def allgather(self, obj):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, np.int64)
        seq = self._arrive("allgather")
        _MPIHandle(self, self.comm.Iallgather(np.array([data.size], np.int64), sizes), "allgather", seq).wait()
        out = np.empty(int(sizes.sum()), np.uint8)
        seq = self._arrive()
        request = self.comm.Iallgatherv(data, [out, sizes.tolist()])
        _MPIHandle(self, request, "allgather", seq).wait()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(out[offsets[i]:offsets[i + 1]].tobytes()) for i in range(self.size)]

    def barrier(self):
        seq = self._arrive("barrier")
        _MPIHandle(self, self.comm.Ibarrier(), "barrier", seq).wait()

    def abort(self, code=1, message=None):
        abort_world(self.MPI.COMM_WORLD, code)

    def dup(self):
        # MPI_Comm_dup blocks in C, past any timeout or signal, until every rank calls it: a timed barrier
        # first finds the ranks that are not coming (naming them), and then the dup does not wait
        self.barrier()
        return MPICommunicator(self.comm, self.timeout, self.shared_memory, self.check_collectives)

    def close(self):
        """Give back the shared buffers and MPI's communicators (MPI has about a thousand: a process that
        makes communicators in a loop must close them). A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        for request, _ in self._sends:
            if not request.Test():
                request.Cancel()
        self._sends = []
        for shared in list(self._shared.values()):
            if shared.in_flight:  # never to be waited for (its owner failed): abandoned, not summed into
                self._abandon(shared)
            self.release(shared.mine)  # arrays already handed out keep their memory mapped
        self.comm.Free()
        self._control.Free()

    def _abandon(self, shared):
        for handle in [h for h in _in_flight if h.shared is shared]:
            _in_flight.remove(handle)
        shared.in_flight = False


# every shared-memory all-reduce of the process started and not yet complete, whichever communicator
# started it: a wait on any communicator advances them all (see _complete)
_in_flight = []


def _key(array):
    return array.ctypes.data, array.size, array.dtype.str


_OPS = ("sum", "mean")
_DTYPE_CODES = {np.dtype(t).str: i for i, t in enumerate((np.float16, np.float32, np.float64, np.int8, np.int16,
                                                           np.int32, np.int64, np.uint8, np.bool_), 1)}


def _describe_call(values):
    kind, size, dtype, detail, shared = (int(v) for v in values)
    if not 0 <= kind < len(_COLLECTIVES):  # not a check's values: a peer made another call
        return "something else (not a checked collective)"
    name = _COLLECTIVES[kind]
    if size < 0:
        return name
    dtype_name = next((np.dtype(s).name for s, c in _DTYPE_CODES.items() if c == dtype), "another dtype")
    op = _OPS[detail] if 0 <= detail < len(_OPS) else f"#{detail}"
    extra = f" op {op}" if name == "allreduce" else f" root {detail}"
    where = ", a comm.buffer()" if shared else ""
    return f"{name} of {size} {dtype_name}{extra}{where}"


class World:
    """MPI's world communicator's rank, size and abort(code)."""

    def __init__(self):
        self._world = _mpi().COMM_WORLD
        self.rank, self.size = self._world.Get_rank(), self._world.Get_size()

    def abort(self, code=1):
        abort_world(self._world, code)


def abort_world(world, code):
    """End every rank of the job with exit status `code` (MPICH's shared-memory segments removed first)."""
    try:
        remove_names(mpich_segments())  # the job ends: no rank maps them after this
    finally:
        world.Abort(code)


def launched_by_mpi(environ):
    """Whether this process looks like one rank of several started by mpiexec/mpirun/srun."""
    return launcher_count(environ) is not None


def launcher_count(environ):
    """(variable, N) when a launcher says it started this process as one of N > 1 (MPI_LOCALNRANKS: of N on
    this machine), else None."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"):
        value = environ.get(key)
        if value and value.isdigit() and int(value) > 1:
            return key, int(value)
    # a task of srun's job step (the batch script itself is no numbered step): srun may start the tasks
    # without any PMI that this MPI understands, and each then starts MPI alone
    step, tasks = environ.get("SLURM_STEP_ID", ""), environ.get("SLURM_STEP_NUM_TASKS", "")
    if step.isdigit() and int(step) < 2**31 and tasks.isdigit() and int(tasks) > 1:
        return "SLURM_STEP_NUM_TASKS", int(tasks)
    return None


def launcher_rank(environ):
    """(rank, size) of this process as its launcher numbered it (before MPI starts), read from one launcher's
    pair of variables, or None."""
    for rank_key, size_key in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE"), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
                               ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        rank, size = environ.get(rank_key, ""), environ.get(size_key, "")
        if rank.isdigit() and size.isdigit() and int(rank) < int(size):
            return int(rank), int(size)
    return None


def check_launch(comm, environ):
    """Refuse a group of one in a process that a launcher started as one of several: the launcher and the
    MPI library do not understand each other, and every process would train alone on all the data."""
    launched = launcher_count(environ)
    if comm.size == 1 and launched is not None:
        key, count = launched
        raise CommError(
            f"{key}={count}: the launcher started this process as one of {count}, but MPI sees a group of 1: the "
            "launcher and the MPI library that mpi4py uses do not match. Use the mpiexec that comes with that "
            "library (pip's mpich wheel installs one), under Slurm `srun --mpi=pmi2`, or an mpi4py built "
            "against the cluster's MPI")
