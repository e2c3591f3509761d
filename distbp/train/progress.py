"""What a run shows and records: a progress bar on a terminal, plain lines elsewhere, metrics as JSON lines."""

import json
import math
import sys
import time
from pathlib import Path

from ..serialization import brief, brief_repr, not_a_regular_file, replace_file
from .config import ConfigError


def _duration(seconds):
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One line per update: a bar redrawn in place on a terminal, or a log line every `every` steps."""

    def __init__(self, total_steps, mode="auto", every=50, stream=None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode, self.total, self.every = mode, total_steps, every
        self.start = time.perf_counter()
        self.first_step = None
        self.samples = 0
        self._drawn = False

    def update(self, step, epoch, loss, batch_samples):
        if self.first_step is None:
            # the clock starts when the first step ends (it pays one-off costs), so its samples are not counted:
            # counted over no time, they made the first rate millions of samples/s
            self.first_step, self.start = step, time.perf_counter()
        else:
            self.samples += batch_samples
        if self.mode == "none":
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        timed = done > 0 and elapsed > 0
        rate = f"{self.samples / elapsed:,.0f}" if timed else "-"
        eta = _duration(elapsed / done * (self.total - step)) if timed else "--:--"
        if self.mode == "bar":
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(
                f"\repoch {epoch + 1} [{bar}] {step}/{self.total} loss {loss:.4f} "
                f"{rate} samples/s ETA {eta} "
            )
            self.stream.flush()
            self._drawn = True
        elif step % self.every == 0 or step == self.total:
            self.line(f"step {step}/{self.total} epoch {epoch + 1} loss {loss:.4f} {rate} samples/s ETA {eta}")

    def line(self, text):
        if self.mode == "none":
            return
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()


class MetricsLog:
    """Appends one JSON object per event to a file (or does nothing without a path)."""

    def __init__(self, path, append=False, after_step=None):
        """append: go on with the file's records; after_step: then drop those past that step first (a run
        resumed from its checkpoint takes those steps again, and records them again)."""
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")
            elif self.path.exists():
                _keep_records_to_go_on_from(self.path, after_step)

    def write(self, **record):
        if self.path:
            try:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: named after the file (a write error names none)
                raise OSError(e.errno, f"cannot write the metrics ({e.strerror})", str(self.path)) from None


def _keep_records_to_go_on_from(path, step):
    """Cut a last record that was never finished (the run was killed while writing it), so that the records
    appended next start on a line of their own, and (step not None) remove the records of steps past `step`
    (lines that are not records are kept, for read_metrics to name). The file is checked to be text first,
    and replaced whole, or left as it was."""
    try:
        text = kept = path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"metrics file {path} is not UTF-8 text ({e.reason} at byte {e.start}): not a metrics "
                          "file to go on with; give --metrics another file") from None
    if kept and not kept.endswith("\n"):
        kept = kept[:kept.rfind("\n") + 1]
    if step is not None:
        kept = "".join(line for line in kept.splitlines(keepends=True) if not _past(line, step))
    if kept != text:
        replace_file(path, [kept.encode()])


PLOTTED = ("train_loss", "test_loss", "test_accuracy")


def _is_number(value, finite=True):
    """An int or float (not a bool, which JSON's true would pass as), finite unless told otherwise (a
    diverged run's loss is NaN), and one that a float holds (a 400-digit integer does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) or not finite
    except OverflowError:
        return False


def _past(line, step):
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # not a record: kept, for read_metrics to name
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step


def read_metrics(path):
    """The records of a metrics file that stand; a malformed line raises ValueError naming it, except an
    unfinished last one (no newline yet: the run is writing it), which is left out.

    A record at a step not past the one before starts the run over from there (steps taken again: a
    parameter-server worker that went back to where its restored servers had it): it replaces the records
    at or after its step."""
    records = []
    what = not_a_regular_file(path, pipe_ok=True)
    if what:
        raise ValueError(f"metrics file {path} is not a regular file or a pipe ({what})")
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"metrics file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"metrics file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a directory, no permission
        raise ValueError(f"metrics file {path}: {e.strerror or e}") from None
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) and not text.endswith("\n"):  # a record still being written: not there yet
                    break
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # nested too deep; a number of 4300+ digits
                raise ValueError(f"{path}:{n}: not a JSON line that can be read ({brief(str(e))})") from None
            if not isinstance(record, dict) or not _is_number(record.get("step")):
                raise ValueError(f"{path}:{n}: not a metrics record (a JSON object with a numeric 'step')")
            for key in PLOTTED:
                if key in record and not _is_number(record[key], finite=False):
                    raise ValueError(f"{path}:{n}: {key} is {brief_repr(record[key])}, not a number")
            while records and records[-1]["step"] >= record["step"]:
                records.pop()
            records.append(record)
    return records


def plot_metrics(metrics_path, out_path):
    """A PNG with the training/test loss and the test accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    test = [(r["step"], r["test_loss"]) for r in records if "test_loss" in r]
    acc = [(r["step"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
    if not (train or test):
        raise ValueError(f"{metrics_path}: no loss records to plot")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for points, label in ((train, "train loss"), (test, "test loss")):
        if points:
            ax_loss.plot(*zip(*points), label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    if acc:
        ax_acc.plot(*zip(*acc), color="tab:green", marker="o", markersize=3)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(Path(metrics_path).name)
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=100)
    except OSError as e:
        raise ValueError(f"cannot write {out_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out_path
