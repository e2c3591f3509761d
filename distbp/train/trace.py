"""Chrome trace-event JSON (viewable in Perfetto or chrome://tracing): one process per rank, one row for
compute (forward, backward, optimizer step) and one for communication (each bucket's all-reduce)."""

import json
import time
from pathlib import Path

LANES = {"compute": 0, "comm": 1}


class Tracer:
    def __init__(self, rank=0, max_steps=50):
        self.rank, self.max_steps = rank, max_steps
        self.origin = time.perf_counter()
        self.events = []
        self.step = 0

    @property
    def active(self):
        return self.step < self.max_steps

    def span(self, name, start, end, lane="compute"):
        if self.active:
            self.events.append({
                "name": name, "ph": "X", "pid": self.rank, "tid": LANES[lane],
                "ts": round((start - self.origin) * 1e6, 1), "dur": round((end - start) * 1e6, 1),
                "args": {"step": self.step},
            })

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
    """One JSON file from every rank's events (each rank's clock starts at its own start)."""
    events = []
    for rank, rank_events in enumerate(events_per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for lane, tid in LANES.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": lane}})
        events.extend(rank_events)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    except OSError as e:  # a full disk: named after the file (a write error names none)
        raise OSError(e.errno, f"cannot write the trace ({e.strerror})", str(path)) from None
