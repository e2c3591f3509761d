"""MPI through mpi4py's buffer methods: contiguous numpy arrays go to MPI directly, never pickled.

Every collective is started non-blocking and completed by polling, so that one which does not complete
within the timeout can end the job naming the ranks that never reached it. Those are found only then, at
no cost to the collectives that do complete: the rank that timed out asks every peer over a second
communicator which collective it is waiting in; a rank waiting in a collective answers from its polling
loop, and a rank that is not (computing, hung, gone) does not answer.
"""

import pickle
import time

import numpy as np

from .base import DEFAULT_TIMEOUT, CollectiveTimeout, Communicator, Handle, check_buffer, check_op

_QUERY, _REPLY = 7, 8
_COLLECTIVES = ("allreduce", "broadcast", "allgather", "barrier")  # answered as an index
_ANSWER_EVERY = 1024  # polls between looks for a peer's question (about a millisecond)


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
            if polls % _ANSWER_EVERY == 0:
                comm._answer_peers(self.seq, self.name)
                if time.monotonic() > deadline:
                    comm._timed_out(self.name, self.seq)
        self._finish()


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        MPI = self.MPI = _mpi()
        base = comm if comm is not None else MPI.COMM_WORLD
        self.comm = base.Dup()
        self._control = base.Dup()  # questions and answers about who waits where (see the module's doc)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._seq = 0
        self._sends = []  # (request, buffer) of questions and answers not known to be delivered
        self._half_op = None

    # --- finding the ranks that did not arrive ---

    def _arrive(self):
        self._seq += 1
        return self._seq

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
            self._send([seq, _COLLECTIVES.index(name)], source, _REPLY)

    def _timed_out(self, name, seq):
        status, answer = self.MPI.Status(), np.zeros(2, np.int64)
        while self._control.Iprobe(source=self.MPI.ANY_SOURCE, tag=_REPLY, status=status):
            self._control.Recv(answer, source=status.Get_source(), tag=_REPLY)  # late answers to an earlier question
        for peer in range(self.size):
            if peer != self.rank:
                self._send([seq, _COLLECTIVES.index(name)], peer, _QUERY)
        waiting = {}  # peer -> (collective #, its name) it waits in
        grace = time.monotonic() + min(2.0, max(self.timeout, 0.1))
        while len(waiting) < self.size - 1 and time.monotonic() < grace:
            self._answer_peers(seq, name)  # a peer that timed out too is asking the same
            if self._control.Iprobe(source=self.MPI.ANY_SOURCE, tag=_REPLY, status=status):
                source = status.Get_source()
                self._control.Recv(answer, source=source, tag=_REPLY)
                waiting[source] = (int(answer[0]), _COLLECTIVES[int(answer[1])])
            else:
                time.sleep(0.001)
        missing = [r for r in range(self.size) if r != self.rank and waiting.get(r) != (seq, name)]
        elsewhere = "".join(f"; rank {r} waits in {waiting[r][1]} (collective #{waiting[r][0]})"
                            for r in missing if r in waiting)
        raise CollectiveTimeout(
            f"rank {self.rank}: {name} (collective #{seq}) did not complete within {self.timeout:g} s; "
            f"rank(s) {missing or 'unknown'} did not arrive{elsewhere}"
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
        for request, _ in self._sends:
            if not request.Test():
                request.Cancel()
        self._sends = []


def launched_by_mpi(environ):
    """Whether this process looks like one rank of several started by mpiexec/mpirun/srun."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"):
        value = environ.get(key)
        if value and value.isdigit() and int(value) > 1:
            return True
    return False
