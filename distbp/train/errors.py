"""Errors of the user's input or of the machine (a full disk, too little memory): reported in one line, by
the command and by every rank of a job alike. Anything else is a bug and keeps its traceback."""

from ..comm import CommError
from ..data.datasets import DataError
from ..ps.client import PSError
from .checkpoint import CheckpointError
from .config import ConfigError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FloatingPointError, CommError, PSError, OSError, MemoryError)


def error_message(e):
    """One line for a USER_ERRORS error."""
    if isinstance(e, MemoryError):
        return f"out of memory{f': {e}' if str(e) else ''} (a smaller model, batch or data set needs less)"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)
