"""MPI through mpi4py's buffer methods: contiguous numpy arrays go to MPI directly, never pickled.

Every collective is started non-blocking and completed by polling, so that one which does not complete
within the timeout can end the job with the ranks that never reached it. Those are known from arrival
notices: on entering collective #k, a rank sends k to every peer over a second communicator.
"""

import pickle
import time

import numpy as np

from .base import DEFAULT_TIMEOUT, CollectiveTimeout, Communicator, Handle, check_buffer, check_op

_NOTICE = 7


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the mpi backend needs mpi4py and an MPI library: pip install mpi4py mpich "
            f"(or build mpi4py against your cluster's MPI) [{e}]"
        ) from None
    return MPI


def _half_sum(inbuf, inoutbuf, datatype):
    # float16 travels as 16-bit integers (MPI has no half type); this operator adds them as halves
    a = np.frombuffer(inbuf, dtype=np.float16)
    b = np.frombuffer(inoutbuf, dtype=np.float16)
    b += a


class _MPIHandle(Handle):
    def __init__(self, comm, request, name, seq, after=None):
        self.comm, self.request, self.name, self.seq, self.after = comm, request, name, seq, after
        self._done = False

    def test(self):
        if not self._done and self.request.Test():
            self._finish()
        return self._done

    def _finish(self):
        self._done = True
        if self.after is not None:
            self.after()

    def wait(self):
        if self._done:
            return
        comm = self.comm
        if comm.timeout is None:
            self.request.Wait()
            self._finish()
            return
        # Poll without sleeping: MPICH advances a non-blocking collective only inside MPI calls, so a
        # sleeping rank would stall the transfer for every rank (MPI_Wait spins the same way).
        deadline = time.monotonic() + comm.timeout
        polls = 0
        while not self.request.Test():
            polls += 1
            if polls % 1024 == 0 and time.monotonic() > deadline:
                comm._timed_out(self.name, self.seq)
        self._finish()


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        MPI = self.MPI = _mpi()
        base = comm if comm is not None else MPI.COMM_WORLD
        self.comm = base.Dup()
        self._notices = base.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._seq = 0
        self._reached = [0] * self.size
        self._sends = []
        self._half_op = None

    # --- arrival notices ---

    def _arrive(self):
        self._seq += 1
        if self.timeout is not None and self.size > 1:
            # receive the peers' notices as they come: unreceived messages pile up in MPI's unexpected
            # queue, costing memory and slowing the matching of every later message
            self._drain_notices()
            self._sends = [r for r in self._sends if not r.Test()]
            for peer in range(self.size):
                if peer != self.rank:
                    self._sends.append(self._notices.isend(self._seq, dest=peer, tag=_NOTICE))
        return self._seq

    def _drain_notices(self):
        status = self.MPI.Status()
        while self._notices.Iprobe(source=self.MPI.ANY_SOURCE, tag=_NOTICE, status=status):
            source = status.Get_source()
            self._reached[source] = max(self._reached[source], self._notices.recv(source=source, tag=_NOTICE))

    def _timed_out(self, name, seq):
        self._drain_notices()
        missing = [r for r in range(self.size) if r != self.rank and self._reached[r] < seq]
        raise CollectiveTimeout(
            f"rank {self.rank}: {name} (collective #{seq}) did not complete within {self.timeout:g} s; "
            f"rank(s) {missing or 'unknown'} did not arrive"
        )

    # --- collectives ---

    def iallreduce(self, array, op="sum"):
        check_buffer(array, "allreduce")
        check_op(op)
        seq = self._arrive()
        MPI = self.MPI
        if array.dtype == np.float16:
            if self._half_op is None:
                self._half_op = MPI.Op.Create(_half_sum, commute=True)
            request = self.comm.Iallreduce(MPI.IN_PLACE, [array.view(np.int16), MPI.SHORT], op=self._half_op)
        else:
            request = self.comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        after = None
        if op == "mean":
            size = self.size

            def after():
                array[...] /= size

        return _MPIHandle(self, request, "allreduce", seq, after)

    def broadcast(self, array, root=0):
        check_buffer(array, "broadcast")
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast: root {root} is not a rank of a group of {self.size}")
        seq = self._arrive()
        _MPIHandle(self, self.comm.Ibcast(array, root=root), "broadcast", seq).wait()

    def allgather(self, obj):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, np.int64)
        seq = self._arrive()
        _MPIHandle(self, self.comm.Iallgather(np.array([data.size], np.int64), sizes), "allgather", seq).wait()
        out = np.empty(int(sizes.sum()), np.uint8)
        seq = self._arrive()
        request = self.comm.Iallgatherv(data, [out, sizes.tolist()])
        _MPIHandle(self, request, "allgather", seq).wait()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(out[offsets[i]:offsets[i + 1]].tobytes()) for i in range(self.size)]

    def barrier(self):
        seq = self._arrive()
        _MPIHandle(self, self.comm.Ibarrier(), "barrier", seq).wait()

    def abort(self, code=1, message=None):
        self.MPI.COMM_WORLD.Abort(code)

    def close(self):
        for r in self._sends:
            r.Cancel()
        self._sends = []


def launched_by_mpi(environ):
    """Whether this process looks like one rank of several started by mpiexec/mpirun/srun."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"):
        value = environ.get(key)
        if value and value.isdigit() and int(value) > 1:
            return True
    return False
