"""All-reduce through memory that the MPI ranks of one machine share.

MPICH's all-reduce of a large array between processes of one machine pipes the data through its own
shared cells: it copies in, copies out, reduces, and does the same again for the result. When every
rank's buffer already lives in one shared segment, no pipe is needed. Between two barriers, each rank
sums its own slice of everyone's buffers and writes that sum back into every buffer. That halves the
memory traffic, and summing a cache-sized piece at a time saves another pass: about 0.55 ms instead of
1.45 ms (MPI's Allreduce) for 7 MB on two ranks here. DataParallel asks the
communicator for its bucket buffers (`Communicator.buffer`), so backward writes the gradients straight
into shared memory.

The segment is a file in /dev/shm. Rank 0 creates it and the other ranks map it. Rank 0 unlinks the
file as soon as every rank has mapped it (or as soon as creating it failed on some rank), so the memory
lives exactly as long as the arrays that view it. Only a rank 0 killed in those few milliseconds leaves
a file behind.

Each slice is summed by one rank and copied to the others, so every rank ends with the same bits. The
plain numpy loads and stores are ordered by the MPI barriers around them: the barrier of a shared-memory
MPI library is built on atomic operations that act as memory fences.
"""

import mmap
import os
import uuid

import numpy as np

SHM_DIR = "/dev/shm"
_PAGE = 4096
_LINE = 64  # slices start on cache-line boundaries: two ranks never write one line
_PIECE_BYTES = 256 * 1024  # reduce_my_slice's unit: fits a core's L2 with the piece it adds


class SharedBuffer:
    """One flat array per rank, all in one segment; `mine` is this rank's, the one handed out."""

    def __init__(self, segment, size, dtype, rank, ranks):
        dtype = np.dtype(dtype)
        stride = _round_up(max(size * dtype.itemsize, 1), _PAGE)
        self.blocks = [np.frombuffer(segment, dtype, size, r * stride) for r in range(ranks)]
        self.mine = self.blocks[rank]
        step = _LINE // dtype.itemsize if _LINE % dtype.itemsize == 0 else 1
        cuts = [min(size, _round_up(size * r // ranks, step)) for r in range(ranks)] + [size]
        self.slice = slice(cuts[rank], cuts[rank + 1])
        self.others = [b for r, b in enumerate(self.blocks) if r != rank]
        self.barriers = None  # the MPI communicator this buffer's all-reduces synchronise on
        self.in_flight = False

    def reduce_my_slice(self):
        """Sum this rank's slice over every rank's buffer and write it into all of them (between barriers).

        A piece at a time, small enough to stay in the core's cache between its sum and its copies: the
        copies then read the sum from cache, not memory."""
        start, stop = self.slice.start, self.slice.stop
        step = max(_PIECE_BYTES // self.mine.itemsize, 1)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            part = self.mine[a:b]
            for other in self.others:
                np.add(part, other[a:b], out=part)
            for other in self.others:
                other[a:b] = part


def create_segment(comm, nbytes_per_rank):
    """Collective over `comm` (one machine): (a shared mmap of comm.size blocks, None), or (None, why not)
    on every rank alike. Ranks asking for different sizes get a ValueError, every one of them.

    `comm` is distbp's MPICommunicator: its allgather times out instead of hanging on a missing rank. The
    file's name is unlinked by rank 0 once every rank has answered, and also if a collective fails.
    """
    total = _round_up(max(nbytes_per_rank, 1), _PAGE) * comm.size
    path, segment, error, created = None, None, None, False
    try:
        if comm.rank == 0:
            path = os.path.join(SHM_DIR, f"distbp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            created = True  # a fresh name of this process's: rank 0 unlinks it whatever happens
            try:
                segment = _map(path, total, create=True)
            except (OSError, ValueError) as e:
                error = f"{path}: {e}"
        asked = comm.allgather((nbytes_per_rank, path, error))
        sizes = [n for n, _, _ in asked]
        if len(set(sizes)) > 1:
            raise ValueError(f"buffer: the ranks asked for different sizes (bytes per rank: {sizes})")
        _, path, created_error = asked[0]
        if comm.rank != 0 and created_error is None:
            try:
                segment = _map(path, total, create=False)
            except (OSError, ValueError) as e:
                error = f"{path}: {e}"
        errors = [e for e in comm.allgather(error) if e]
    except BaseException:
        if segment is not None:
            segment.close()
        raise
    finally:
        if created:
            _unlink(path)  # every rank has it mapped, gave up, or the collective failed: the name can go
    if errors:
        if segment is not None:
            segment.close()
        return None, errors[0]
    return segment, None


def _map(path, total, create):
    """A shared mmap of the `total` bytes of the file at `path`, which create=True makes (exclusively)."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:  # reserve the pages now: a full /dev/shm fails here, not with a SIGBUS on first touch
            os.posix_fallocate(fd, 0, total)
        return mmap.mmap(fd, total)
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _round_up(n, multiple):
    return -(-n // multiple) * multiple
