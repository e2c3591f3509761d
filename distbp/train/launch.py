"""Running a training job on the configured backend: one process, thread ranks, or MPI ranks."""

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace

from threadpoolctl import threadpool_limits

from ..comm import GroupAborted, RankFailed, detect_backend, mpi_communicator, mpi_world, run_ranks
from ..comm.mpi import launcher_count
from ..data.datasets import fingerprint, read_only
from .config import ConfigError, check_outputs, check_pem, keys_given, ps_settings
from .errors import USER_ERRORS, error_message
from .steps import LocalStep, allreduce_step
from .trainer import Trainer, build_data


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending or preempting the job): training stops as on Ctrl-C, cleanly (a checkpoint
    being written is finished or removed, never left half-written), with the shell's code for it."""

    code, what = 143, "terminated"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's option numbers (malloc.h)
KEPT_BLOCK_BYTES = 32 * 2**20  # glibc's largest mmap threshold on 64-bit
KEPT_FREE_BYTES = 4 * KEPT_BLOCK_BYTES


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks of up to 32 MB, and up to 128 MB of free heap, for reuse.

    A training step frees and allocates again the same large temporaries every step. By default glibc
    gives a block above a threshold (one that moves with the process's history) a mapping of its own,
    unmapped when freed, and returns free heap above another to the system, so a step can fault in and
    zero fresh pages again and again: 12,000 page faults a step for the charlm model here, about a
    quarter of its time. A process of `distbp train` or `distbp ps serve` sets this once at start.
    Nothing is changed where the C library is not glibc, or where the user tunes malloc (any MALLOC_
    variable, or glibc.malloc in GLIBC_TUNABLES). Returns what was set, or None.
    """
    if not sys.platform.startswith("linux") or any(v.startswith("MALLOC_") for v in os.environ) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        libc.gnu_get_libc_version  # noqa: B018 -- glibc's alone: another library's mallopt means other things
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)):
        return None
    return f"malloc keeps freed blocks up to {KEPT_BLOCK_BYTES >> 20} MB and {KEPT_FREE_BYTES >> 20} MB of free heap"


def stop_on_sigterm():
    """Make SIGTERM raise Terminated in the main thread; returns a function that puts back the handler it
    replaced (one that does nothing outside the main thread, where no handler can be set, or where SIGTERM
    is ignored, as the job's parent wanted)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        return lambda: None

    def terminate(signum, frame):
        raise Terminated()

    replaced = signal.signal(signal.SIGTERM, terminate)
    hook = sys.unraisablehook
    sys.unraisablehook = _stop_again_if_dropped(hook)

    def restore():
        signal.signal(signal.SIGTERM, replaced if replaced is not None else signal.SIG_DFL)
        sys.unraisablehook = hook

    return restore


def _stop_again_if_dropped(hook):
    """An unraisablehook that signals the process again when a stop was dropped.

    A signal handler runs wherever the main thread is. If that is a finalizer or a weakref callback (one
    runs inside every import), Python prints the handler's exception and drops it. The process then ran on:
    a worker whose SIGTERM came during an import went on waiting for its servers. So the same signal is
    sent again, a moment later, when it will most likely land elsewhere."""

    def unraisable(event):
        if not isinstance(event.exc_value, KeyboardInterrupt):  # (Ctrl-C's, or Terminated)
            hook(event)
            return
        # not reported: the stop is not lost, and the job ends with its usual one line
        signum = signal.SIGTERM if isinstance(event.exc_value, Terminated) else signal.SIGINT
        again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()

    return unraisable


def _ignore_stop_signals():
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_ALLREDUCE_KEYS = ("bucket_cap_mb", "allow_unused", "compress", "timeout")
_PS_KEYS = ("ps", "ps_token", "ps_tls_ca", "ps_tls_cert", "ps_tls_key", "ps_worker_id", "ps_retry_seconds")


def chosen_backend(config):
    """The backend the config asks for, 'auto' resolved (unchecked: see resolve_backend)."""
    if config.backend == "auto":  # parameter-server addresses say which backend is meant
        return "ps" if config.ps else detect_backend()
    return config.backend


def resolve_backend(config):
    """chosen_backend(config), refusing options that do not apply to it."""
    backend = chosen_backend(config)
    started_as = launcher_count(os.environ)
    if backend in ("local", "threads") and started_as:
        # each process would train alone on all the data, and all would write the same output files
        raise ConfigError(f"backend {backend} in one of {started_as[1]} processes started by an MPI launcher "
                          f"({started_as[0]}={started_as[1]}): each would train alone; use --backend mpi (or "
                          "auto), or start one process")
    if backend != "threads" and config.world_size != 1:
        who = {"mpi": "the launcher (mpiexec -n N)", "ps": "the servers' --workers"}.get(backend)
        raise ConfigError(f"config: 'world_size' is for the threads backend"
                          f"{f'; with {backend}, {who} sets the number of ranks' if who else ''}")
    # no all-reduce to tune: with the backend left to auto, one rank (local) may be one of a sweep of
    # ranks counts run with the same options, so only a local backend asked for refuses them
    if backend == "ps" or config.backend == "local":
        given = keys_given(config, _ALLREDUCE_KEYS)
        if given:
            raise ConfigError(f"config: {', '.join(repr(k) for k in given)} "
                              f"{'is an option' if len(given) == 1 else 'are options'} of the all-reduce (backends "
                              f"threads and mpi), but the backend is {backend}")
    ps_given = keys_given(config, _PS_KEYS)
    if backend != "ps" and ps_given:  # they would be ignored: a run meant for the servers would train alone
        missing = "" if config.ps else " (and 'ps' gives the servers' addresses)"
        raise ConfigError(f"config: {', '.join(repr(k) for k in ps_given)} "
                          f"{'is an option' if len(ps_given) == 1 else 'are options'} of backend ps{missing}, "
                          f"but the backend is {backend}")
    return backend


def run(config, stream=None):
    """Train as configured; returns rank 0's summary. Errors from any rank are raised here (threads) or
    end every rank of the job (mpi)."""
    backend = resolve_backend(config)
    limits = threadpool_limits(config.threads) if config.threads else None
    try:
        if backend == "local":
            return Trainer(config, LocalStep(), stream).fit()
        if backend == "ps":
            return _run_ps(config, stream)
        if backend == "threads":
            # the data once for all ranks (each loading its own took 42 s before the first step with 500 ranks)
            split = read_only(build_data(config))
            results = run_ranks(config.world_size,
                                lambda comm: Trainer(config, allreduce_step(config, comm), stream, split).fit(),
                                config.timeout)
            return results[0]
        return _run_mpi(config, stream)
    finally:
        if limits is not None:
            limits.restore_original_limits()


def _run_mpi(config, stream):
    try:
        comm = mpi_communicator(config.timeout)
    except BaseException as e:  # the peers may wait in a collective of the communicator's making
        world = mpi_world()
        if world.size == 1:  # this process alone: reported as on one process
            raise
        _end_job(world, e)
    try:
        return Trainer(config, allreduce_step(config, comm), stream).fit()
    except BaseException as e:
        _end_job(comm, e)


def _end_job(comm, e):
    """Report this rank's exception and end every rank now, rather than leave them waiting for this one."""
    if isinstance(e, SystemExit) and not e.code:
        raise e
    _ignore_stop_signals()  # a second Ctrl-C or SIGTERM must not escape before MPI_Abort
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM reaches every rank: no traceback, the shell's code
        code, what = (e.code, e.what) if isinstance(e, Terminated) else (130, "interrupted")
        sys.stderr.write(f"distbp: rank {comm.rank} of {comm.size} {what}\n")
        _abort(comm, code)
        raise SystemExit(code) from None  # reported: the command must not report it again
    if isinstance(e, GroupAborted):
        detail = ""
    elif isinstance(e, USER_ERRORS):
        detail = error_message(e)
    else:
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
    sys.stderr.write(f"distbp: rank {comm.rank} of {comm.size} failed: {detail}\n")
    code = 2 if isinstance(e, USER_ERRORS) else 1  # as on one rank
    if code == 1:
        traceback.print_exception(e)
    _abort(comm, code)
    raise SystemExit(code) from None  # reported: the command must not report it again


def _abort(comm, code):
    """End every rank, once this rank's message has had a moment to travel: mpiexec forwards a rank's output
    from a pipe, and an abort tears the job down at once, sometimes before it has read what is there."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.3)
    comm.abort(code)


__all__ = ["run", "chosen_backend", "resolve_backend", "RankFailed", "Terminated", "stop_on_sigterm"]


def _run_ps(config, stream):
    from ..ps.client import PSStep, parse_addresses
    from ..ps.server import check_token
    from .ps_service import token_and_source

    if not config.ps:
        raise ConfigError("config: backend 'ps' needs 'ps' (the parameter servers' HOST:PORT addresses)")
    if config.checkpoint or config.init_from or config.resume:
        raise ConfigError("config: with backend 'ps' the servers hold the parameters and checkpoint them "
                          "(distbp ps serve --checkpoint-path), and a worker goes on where they have its run; "
                          "drop 'checkpoint', 'resume' and 'init_from' from the worker")
    token, token_from = token_and_source(config.ps_token, "config: ps_token")
    config = replace(config, ps_token=token)
    if config.ps_token is not None:
        try:
            check_token(config.ps_token, token_from)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.grad_clip:
        raise ConfigError("config: grad_clip is not supported with backend 'ps': a worker would clip its own "
                          "gradient, not the averaged one (and each shard holds only part of it)")
    check_outputs(config, ("metrics", "trace"))  # before registering: a refused worker would hold its id
    if bool(config.ps_tls_cert) != bool(config.ps_tls_key):
        raise ConfigError("config: mutual TLS needs both 'ps_tls_cert' and 'ps_tls_key'")
    for key in ("ps_tls_ca", "ps_tls_cert", "ps_tls_key"):
        if getattr(config, key):
            check_pem(f"config: '{key}'", getattr(config, key))
    try:
        addresses = parse_addresses(config.ps)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    split = build_data(config)  # before registering: the servers compare its fingerprint with their data's
    step = PSStep(addresses, config.ps_token, config.ps_tls_ca, config.ps_retry_seconds,
                  requested_id=config.ps_worker_id, tls_cert=config.ps_tls_cert, tls_key=config.ps_tls_key,
                  settings={**ps_settings(config), "data": fingerprint(split)})
    return Trainer(config, step, stream, split).fit()
