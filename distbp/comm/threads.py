"""N ranks inside one process, one thread each: the single-process test mode.

The ranks share nothing but a `ThreadGroup`; every collective is a rendezvous in it. Each rank has a
communication thread that runs its collectives in the order they were issued, so a non-blocking
all-reduce really proceeds while the rank's own thread continues with backward.
"""

import pickle
import queue
import threading
import time
import weakref
from concurrent.futures import Future

import numpy as np

from .base import (
    DEFAULT_TIMEOUT, CollectiveTimeout, CommError, Communicator, GroupAborted, Handle, check_buffer, check_op,
    check_root,
)


class ThreadGroup:
    """The meeting place of `size` thread ranks."""

    def __init__(self, size, timeout=DEFAULT_TIMEOUT):
        if size < 1:
            raise ValueError(f"a thread group needs at least one rank, got {size}")
        self.size, self.timeout = size, timeout
        self._cond = threading.Condition()
        # (channel, sequence number) -> rendezvous state. A channel is a communicator and its copies on the
        # ranks: () the group's own, (k,) its k-th dup(), (k, j) that one's j-th, ...
        self._pending = {}
        self.failure = None  # (rank, message) of the first rank that failed
        # (channel, rank): that rank's communicator of the channel is closed, and it enters no more of the
        # channel's collectives (closing one closes its copies too, after the collectives already queued on them)
        self.left = set()

    def communicators(self, timeout=None):
        return [ThreadCommunicator(self, r, self.timeout if timeout is None else timeout) for r in range(self.size)]

    def abort(self, rank, message):
        with self._cond:
            if self.failure is None:
                self.failure = (rank, message)
            self._cond.notify_all()

    def leave(self, rank, channel=()):
        """A rank's communicator has made its last collective: a peer waiting for it in another need not
        wait for the timeout."""
        with self._cond:
            self.left.add((channel, rank))
            self._cond.notify_all()

    def _check_failure(self, rank):
        """Raise once any rank has failed, this one included: its queued collectives must not wait for
        peers that have stopped."""
        if self.failure is not None:
            failed, message = self.failure
            raise GroupAborted(message if failed == rank else f"rank {failed} failed: {message}")

    def _fail_collective(self, rank, entry, message):
        """A collective that cannot complete: every rank in it, waiting or still to come, raises message
        (lock held)."""
        entry["error"], entry["done"] = message, True
        self.failure = self.failure or (rank, message)
        self._cond.notify_all()
        raise GroupAborted(message)

    def meet(self, rank, seq, name, payload, combine, timeout, channel=()):
        """Deposit this rank's payload for collective `seq` of `channel`; once all have, return combine(payloads).

        combine runs once, in the last rank to arrive, while the others wait: their inputs stay untouched
        until the result exists.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        key = (channel, seq)
        with self._cond:
            entry = self._pending.get(key)
            if entry is not None and entry.get("error"):
                raise GroupAborted(entry["error"])
            self._check_failure(rank)
            if entry is None:
                entry = self._pending[key] = {"name": name, "payloads": [None] * self.size, "count": 0,
                                              "result": None, "done": False, "taken": 0, "error": None}
            elif entry["name"] != name:
                self._fail_collective(rank, entry, (
                    f"rank {rank} entered {name} as collective #{seq} where another rank entered "
                    f"{entry['name']}: the ranks issue collectives in different orders"))
            entry["payloads"][rank] = (payload,)
            entry["count"] += 1
            if entry["count"] == self.size:
                try:
                    entry["result"] = combine([p[0] for p in entry["payloads"]])
                except GroupAborted as e:  # the ranks' calls disagree: each of them must hear it
                    self._fail_collective(rank, entry, str(e))
                entry["done"] = True
                self._cond.notify_all()
            while not entry["done"]:
                self._check_failure(rank)
                gone = [r for r, p in enumerate(entry["payloads"]) if p is None and (channel, r) in self.left]
                if gone:
                    self._fail_collective(rank, entry, (
                        f"rank {rank}: {name} (collective #{seq}) cannot complete: rank(s) {gone} closed their "
                        "communicator without entering it (their programs made fewer collectives)"))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    missing = [r for r, p in enumerate(entry["payloads"]) if p is None]
                    message = (f"rank {rank}: {name} (collective #{seq}) did not complete within {timeout:g} s; "
                               f"rank(s) {missing} did not arrive")
                    self.failure = self.failure or (rank, message)
                    self._cond.notify_all()
                    raise CollectiveTimeout(message)
                self._cond.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))
            if entry["error"]:
                raise GroupAborted(entry["error"])
            result = entry["result"]
            entry["taken"] += 1
            if entry["taken"] == self.size:
                del self._pending[key]
            return result


class _FutureHandle(Handle):
    def __init__(self, future):
        self._future = future

    def wait(self):
        return self._future.result()

    def test(self):
        return self._future.done()


_DROPPED = object()  # the communicator was collected without close()


def _run_collectives(jobs, group, rank, channel):
    """A rank's communication thread: run the collectives queued on `jobs` in order, until None (closed)."""
    while True:
        item = jobs.get()
        if item is None:  # closed, after every collective queued before
            group.leave(rank, channel)
            return
        if item is _DROPPED:
            return
        future, fn = item
        del item  # (the job refers to its communicator: not kept while waiting for the next)
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the handle
                future.set_exception(e)
        del future, fn


class ThreadCommunicator(Communicator):
    backend = "threads"

    def __init__(self, group, rank, timeout=DEFAULT_TIMEOUT, channel=()):
        super().__init__(timeout)
        self.group, self.rank, self.size = group, rank, group.size
        self.channel = channel  # see ThreadGroup._pending
        self._seq = 0
        self._dups = 0
        self._copies = weakref.WeakSet()  # its dup()s, closed with it
        self._reducing = set()  # addresses of the arrays being all-reduced (MPI forbids touching them meanwhile)
        self._queue = queue.Queue()
        # the thread holds the queue, not the communicator: one dropped without close() is collected, and
        # its finalizer ends the thread. Quietly: the rank may go on through another object of its channel
        # (each thread calling group.communicators() and keeping its own), so it has not left
        self._worker = threading.Thread(target=_run_collectives, args=(self._queue, group, rank, channel),
                                        name=f"distbp-comm-{rank}", daemon=True)
        self._worker.start()
        weakref.finalize(self, self._queue.put, _DROPPED)

    def _submit(self, name, payload, combine, finish, cleanup=None):
        self._seq += 1
        seq, timeout = self._seq, self.timeout

        def run():
            try:
                result = self.group.meet(self.rank, seq, name, payload, combine, timeout, self.channel)
            except BaseException:
                if cleanup is not None:
                    cleanup()
                raise
            return finish(result)

        future = Future()
        self._queue.put((future, run))
        return _FutureHandle(future)

    def iallreduce(self, array, op="sum"):
        check_buffer(array, "allreduce")
        check_op(op, array)
        address = array.__array_interface__["data"][0]
        if array.size and address in self._reducing:
            raise RuntimeError("allreduce: this buffer is still being all-reduced; wait() for that first")
        size = self.size

        def combine(calls):
            _check_agree("allreduce", [(a.shape, str(a.dtype), o) for a, o in calls], "(shape, dtype, op)")
            total = calls[0][0].copy()
            for a, _ in calls[1:]:
                total += a
            if op == "mean":
                total /= size
            return total

        def finish(total):
            self._reducing.discard(address)
            np.copyto(array, total)

        self._reducing.add(address)
        return self._submit("allreduce", (array, op), combine, finish, cleanup=lambda: self._reducing.discard(address))

    def broadcast(self, array, root=0):
        check_buffer(array, "broadcast")
        root = check_root(root, self.size)

        def combine(calls):
            _check_agree("broadcast", [(a.shape, str(a.dtype), r) for a, r in calls], "(shape, dtype, root)")
            return calls[root][0].copy()

        self._submit("broadcast", (array, root), combine, lambda value: np.copyto(array, value)).wait()

    def allgather(self, obj):
        # pickled as MPI's allgather pickles: each rank gets its own copies, and what cannot travel fails here
        data = pickle.dumps(obj)
        return self._submit("allgather", data, list, lambda values: [pickle.loads(v) for v in values]).wait()

    def barrier(self):
        self._submit("barrier", None, lambda _: None, lambda _: None).wait()

    def abort(self, code=1, message="aborted"):
        self.group.abort(self.rank, message)

    def dup(self):
        # the k-th dup() of a channel is channel + (k,) on every rank: they call it in the same order
        self._dups += 1
        copy = ThreadCommunicator(self.group, self.rank, self.timeout, self.channel + (self._dups,))
        self._copies.add(copy)
        return copy

    def close(self):
        for copy in list(self._copies):  # (a rank's program ended without closing them: they leave too)
            copy.close()
        self._queue.put(None)


def _check_agree(name, calls, what):
    """Every rank's call of a collective must be the same: else a clear error on all of them."""
    if any(c != calls[0] for c in calls):
        listed = ", ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
        raise GroupAborted(f"{name}: the ranks' calls differ in {what}: {listed}")


def run_ranks(size, fn, timeout=DEFAULT_TIMEOUT):
    """Run fn(communicator) on `size` thread ranks; return their results in rank order.

    A rank that raises aborts the group, so the others stop instead of waiting for it; the first
    failure is re-raised here with the rank that caused it.
    """
    group = ThreadGroup(size, timeout)
    comms = group.communicators()
    results, errors = [None] * size, [None] * size
    # Waited on instead of joining: in Python 3.11 a join that Ctrl-C interrupts marks the running thread
    # as stopped (its bpo-45274 handling), so the join after the abort returned at once, and the process
    # exited under a rank still writing its checkpoint (its temporary file was left behind).
    finished = [threading.Event() for _ in range(size)]

    def body(rank):
        try:
            results[rank] = fn(comms[rank])
        except BaseException as e:
            errors[rank] = e
            group.abort(rank, f"{type(e).__name__}: {e}")
        finally:
            comms[rank].close()
            finished[rank].set()

    threads = [threading.Thread(target=body, args=(r,), name=f"distbp-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    try:
        _wait_for_all(finished)
    except BaseException:  # Ctrl-C or SIGTERM reach the main thread only: every rank stops at its next collective
        group.abort(-1, "stopped: the process was interrupted")
        _wait_for_all(finished)
        raise
    for t in threads:
        t.join()  # each has finished its work: only its exit is left
    if group.failure is not None:
        rank = group.failure[0]
        if not any(errors):  # a collective that failed in no rank's program (left queued when it ended)
            raise RankFailed(rank, GroupAborted(group.failure[1]))
        first = errors[rank] or next(e for e in errors if e is not None)
        cause = next((r for r, e in enumerate(errors) if e is not None and not isinstance(e, CommError)), None)
        if isinstance(first, CommError) and cause is not None:
            # a peer's collective may fail first when the failing rank closes its communicators on the way
            # out: the rank's own error is the cause
            rank, first = cause, errors[cause]
        # ranks that failed alike (a refused checkpoint, say): naming whichever thread was first blamed it
        alike = [r for r, e in enumerate(errors) if type(e) is type(first) and str(e) == str(first)]
        raise RankFailed(min(alike, default=rank), first, every=len(alike) == size > 1) from first
    return results


def _wait_for_all(events):
    for done in events:
        while not done.wait(0.1):  # a timeout, so that a signal is seen even where a wait is not interrupted
            pass


class RankFailed(RuntimeError):
    """A thread rank's error, which stopped the group. every: each rank failed with the same error."""

    def __init__(self, rank, error, every=False):
        self.who = "every rank" if every else f"rank {rank}"
        super().__init__(f"{self.who} failed: {type(error).__name__}: {error}")
        self.rank, self.error, self.every = rank, error, every
