"""Chrome trace-event JSON (viewable in Perfetto or chrome://tracing): one process per rank, one row for
compute (forward, backward, optimizer step) and rows for communication (each bucket's all-reduce; all-reduces
in flight at once go on rows of their own, as the format draws only nested or disjoint spans on one row)."""

import json
import time
from pathlib import Path

COMPUTE_TID = 0


class Tracer:
    """Spans of the first `max_steps` steps of one rank.

    origin: the perf_counter() time that is 0 in the trace, the same on every rank (the monotonic clock is
    the machine's: ranks of one machine line up). run_step: the step of the run that spans now belong to,
    set by the trainer as each step starts (a resumed run's, or a parameter-server worker's that the
    servers moved, are not the count of steps traced)."""

    def __init__(self, rank=0, max_steps=50, origin=None):
        self.rank, self.max_steps = rank, max_steps
        self.origin = time.perf_counter() if origin is None else origin
        self.events = []
        self.step = 0  # steps traced so far
        self.run_step = 1
        self.written = False
        self._comm_rows = []  # each communication row's last end, in trace microseconds

    @property
    def active(self):
        return self.step < self.max_steps

    def span(self, name, start, end, lane="compute"):
        if not self.active:
            return
        # whole microseconds, ends rounded rather than durations: neighbouring spans must not overlap by a
        # rounding (integers, so that ts + dur is exact too)
        ts, te = round((start - self.origin) * 1e6), round((end - self.origin) * 1e6)
        if lane == "compute":
            tid = COMPUTE_TID
        else:  # the first communication row free at `ts`
            row = next((i for i, last in enumerate(self._comm_rows) if last <= ts), len(self._comm_rows))
            if row == len(self._comm_rows):
                self._comm_rows.append(te)
            else:
                self._comm_rows[row] = te
            tid = 1 + row
        self.events.append({"name": name, "ph": "X", "pid": self.rank, "tid": tid, "ts": ts,
                            "dur": te - ts, "args": {"step": self.run_step}})

    def time(self, name, lane="compute"):
        return _Span(self, name, lane)


class _Span:
    def __init__(self, tracer, name, lane):
        self.tracer, self.name, self.lane = tracer, name, lane

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.tracer.span(self.name, self.start, time.perf_counter(), self.lane)
        return False


def write_trace(path, events_per_rank):
    """One JSON file from every rank's events, with each rank's process and rows named."""
    events = []
    for rank, rank_events in enumerate(events_per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        rows = sorted({e["tid"] for e in rank_events} | {COMPUTE_TID})
        for tid in rows:
            name = "compute" if tid == COMPUTE_TID else "all-reduce" if tid == 1 else f"all-reduce {tid}"
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
        events.extend(rank_events)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    except OSError as e:  # a full disk: named after the file (a write error names none)
        raise OSError(e.errno, f"cannot write the trace ({e.strerror})", str(path)) from None
