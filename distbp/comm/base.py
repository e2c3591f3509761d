"""The Communicator interface that every backend implements, and its errors.

Collectives work in place on contiguous numpy arrays. Every rank must call the same collectives in the
same order; each call carries a sequence number so that a collective that does not complete in time can
be reported with the ranks that never reached it.
"""

import numpy as np

DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for its peers


class CommError(RuntimeError):
    """A collective failed: a peer is missing, crashed, or the group was aborted."""


class CollectiveTimeout(CommError):
    pass


class GroupAborted(CommError):
    """Another rank failed, so this one stops too."""


def check_buffer(array, name):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"{name}: the array must be C-contiguous and writeable")


class Handle:
    """A pending non-blocking collective; wait() completes it (and raises its error, if any)."""

    def wait(self):
        raise NotImplementedError

    def test(self):
        """True once complete; also lets the backend make progress."""
        raise NotImplementedError


class DoneHandle(Handle):
    def wait(self):
        return None

    def test(self):
        return True


class Communicator:
    """rank, size, and the collectives: allreduce, iallreduce, broadcast, allgather, barrier."""

    rank = 0
    size = 1
    backend = "base"

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        """timeout: seconds a collective waits for its peers before it fails naming them (None: no limit)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"a communicator's timeout must be > 0 seconds (or None: no limit), not {timeout!r}")
        self.timeout = timeout

    def buffer(self, size, dtype=np.float32):
        """A zeroed flat array of `size` that this communicator all-reduces fastest (for buffers that are
        reduced again and again, as DataParallel's buckets). Collective: every rank asks for the same."""
        return np.zeros(size, dtype)

    def release(self, array):
        """Give back a buffer() that will not be all-reduced again (collective, like buffer())."""

    def allreduce(self, array, op="sum"):
        """Reduce `array` over ranks in place: op 'sum' or 'mean'."""
        self.iallreduce(array, op).wait()

    def iallreduce(self, array, op="sum"):
        raise NotImplementedError

    def broadcast(self, array, root=0):
        """Overwrite `array` on every rank with root's."""
        raise NotImplementedError

    def allgather(self, obj):
        """A list of every rank's small Python object (pickled: for metadata, never for tensors)."""
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def abort(self, code=1):
        """Stop every rank of the group (after this rank failed)."""
        raise SystemExit(code)

    def dup(self):
        """A communicator of the same ranks whose collectives never pair with this one's (MPI_Comm_dup), for
        a library that issues collectives at moments its caller does not see (DataParallel's buckets).
        Collective: every rank calls it, in the same order. close() it when done."""
        raise NotImplementedError(f"{type(self).__name__} has no dup(), which DataParallel needs: a copy of the "
                                  "communicator whose collectives never pair with the caller's")

    def close(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


def check_op(op, array):
    if op not in ("sum", "mean"):
        raise ValueError(f"allreduce: op must be 'sum' or 'mean', not {op!r}")
    if array.dtype == np.bool_:  # MPI has no sum of booleans (the threads backend's numpy sum was an OR)
        raise TypeError("allreduce: a bool array has no sum; all-reduce it as integers (astype(np.int32))")
    if op == "mean" and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"allreduce: op 'mean' needs a floating-point array (the mean of {array.dtype} values is "
                         "not one); all-reduce the sum and divide")
    return op


def check_root(root, size):
    """The root of a collective: a rank of the group, as an int (1.0 or True is not a rank)."""
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"broadcast: root must be an integer rank, not {root!r}")
    if not 0 <= root < size:
        raise ValueError(f"broadcast: root {root} is not a rank of a group of {size}")
    return int(root)


class LocalCommunicator(Communicator):
    """A group of one: every collective is the identity."""

    backend = "local"

    def iallreduce(self, array, op="sum"):
        check_buffer(array, "allreduce")
        check_op(op, array)
        return DoneHandle()

    def broadcast(self, array, root=0):
        check_buffer(array, "broadcast")
        check_root(root, 1)

    def allgather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def dup(self):
        return LocalCommunicator(self.timeout)
