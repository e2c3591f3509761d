"""One Communicator interface (rank, size, allreduce, iallreduce, broadcast, allgather, barrier) and its
backends: local (a group of one), threads (N ranks in one process, for tests) and mpi (mpi4py)."""

import os
import shutil
import sys
from pathlib import Path

from .base import (
    DEFAULT_TIMEOUT, CollectiveTimeout, CommError, Communicator, GroupAborted, Handle, LocalCommunicator,
)
from .threads import RankFailed, ThreadCommunicator, ThreadGroup, run_ranks

BACKENDS = ("auto", "local", "threads", "mpi")


def find_mpiexec():
    """The launcher of the MPI this Python uses: in a virtual environment, the mpich wheel's mpiexec beside
    its interpreter (even when it is not on PATH), else the first on PATH (beside a system Python may be
    the system's own MPI, not the wheel's); None when there is none."""
    beside = Path(sys.executable).with_name("mpiexec")
    if sys.prefix != sys.base_prefix and beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


def detect_backend(environ=None):
    """'mpi' when started as one of several ranks by an MPI launcher, else 'local'."""
    from .mpi import launched_by_mpi

    return "mpi" if launched_by_mpi(os.environ if environ is None else environ) else "local"


def mpi_world():
    """MPI's world: its rank, size and abort(code), to end the job when no communicator could be made."""
    from .mpi import World

    return World()


def mpi_communicator(timeout=DEFAULT_TIMEOUT):
    """COMM_WORLD's communicator; refused when a launcher started several processes and MPI sees one."""
    from .mpi import MPICommunicator, check_launch

    comm = MPICommunicator(timeout=timeout)
    check_launch(comm, os.environ)
    return comm
