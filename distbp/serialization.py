"""safetensors files, written atomically and read without running any code.

The layout: an 8-byte little-endian header length, a JSON header naming each array's dtype, shape and
byte range (plus free-form string "__metadata__"), then the raw little-endian bytes, which the byte ranges
cover exactly (no overlap, gap or trailing byte: the reader refuses a file that breaks this). Writing goes to a
temporary file in the same directory, is flushed to disk, then renamed over the old file: a crash at any
point leaves either the old file or the new one, never a torn one.

distbp also stores a CRC-32 of the rest of the header and of the data in the metadata (CHECKSUM_KEY), and
the reader checks it when it is there: a file damaged on disk or in a copy is refused, not loaded as
other weights. Files written by other programs have none and are read as they are.
"""

import glob
import hashlib
import json
import math
import os
import shutil
import socket
import stat
import struct
import threading
import zlib
from pathlib import Path

import numpy as np


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


CHECKSUM_KEY = "distbp-crc32"
_HOST = socket.gethostname().replace("/", "_")[:64] or "host"


def _temporary_prefix(path):
    """The start of the names of `path`'s temporary files (PID-THREAD-HOST follows): its own name, or a digest
    of it where that name and the rest would pass the file system's 255 bytes."""
    prefix = f".{path.name}.tmp-"
    if len(prefix.encode()) + 100 > 255:
        prefix = f".{hashlib.sha1(path.name.encode()).hexdigest()[:20]}.tmp-"
    return prefix


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit, with the reason."""


def _remove_stale_temporaries(path):
    """Delete temporary files of `path` left by writers that were killed mid-write (their process is gone):
    a job preempted again and again would otherwise pile them up beside the checkpoint."""
    prefix = _temporary_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        # .NAME.tmp-PID-THREAD-HOST (older versions: .NAME.tmp-PID): a pid means something on its own machine
        # only, and a directory on a shared file system holds other machines' temporaries too
        pid, _, rest = tmp.name[len(prefix):].partition("-")
        host = rest.partition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or (host and host != _HOST):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # alive (another user's process): leave it


def check_finite(path, arrays, prefix, writing=False):
    """Refuse a checkpoint holding NaN, or infinity in its parameters (the arrays named `prefix`...): its run
    had diverged, or the file is damaged, and training from it would fail later, blamed on the learning
    rate. (Other optimizer state may be infinite in a sound run: Adam's squared gradients overflow first.)
    writing: the arrays are about to be saved to `path`; such a file is not written (it would replace the
    last good checkpoint with one that cannot be resumed)."""
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            continue
        parameter = name.startswith(prefix)
        if not np.isfinite(array).all() if parameter else np.isnan(array).any():
            what = "non-finite values (NaN or infinity)" if parameter else "NaN"
            if writing:
                raise CheckpointError(f"{path} not written: {name} holds {what}, so training has diverged (a lower "
                                      "learning rate or grad_clip may help); the file keeps its last checkpoint")
            raise CheckpointError(f"{path}: {name} holds {what}: the run that wrote it had diverged, or the file "
                                  "is damaged")


def save_safetensors(path, arrays, metadata=None):
    """Write name -> array as a safetensors file, atomically (see replace_file)."""
    header = {}
    offset = 0
    blobs = []
    for name, arr in arrays.items():
        if name == "__metadata__":  # the format's own key: the file would not load
            raise CheckpointError("cannot store an array named '__metadata__': the format reserves the name")
        arr = np.asarray(arr)
        code = _CODES.get(arr.dtype.newbyteorder("="))
        if code is None:
            raise CheckpointError(f"cannot store {name}: dtype {arr.dtype} has no safetensors code")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        if CHECKSUM_KEY in metadata:
            raise CheckpointError(f"cannot store metadata named {CHECKSUM_KEY!r}: distbp writes that key itself")
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    checksum = _checksum(header, blobs)
    header.setdefault("__metadata__", {})[CHECKSUM_KEY] = str(checksum)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    replace_file(path, [struct.pack("<Q", len(head)), head, *blobs])


def _checksum(header, data):
    """CRC-32 of the header as JSON without the checksum (entries first, then any metadata, as written) and
    of the data's pieces in order."""
    crc = zlib.crc32(json.dumps(header, separators=(",", ":")).encode())
    for piece in data:
        crc = zlib.crc32(piece, crc)
    return crc


def _check_checksum(path, header, metadata, body):
    """Refuse a file whose stored checksum (when there is one) does not match what was read."""
    if CHECKSUM_KEY not in metadata:
        return
    stored = metadata.pop(CHECKSUM_KEY)
    written = dict(header)
    if metadata:
        written["__metadata__"] = metadata
    if stored != str(_checksum(written, [body])):
        raise CheckpointError(f"{path}: the file is damaged: its contents do not match the checksum it was "
                              "written with")


def replace_file(path, pieces):
    """Write the bytes `pieces` to `path` atomically: to a temporary file beside it, flushed to disk, then
    renamed over it, so a crash at any point leaves the old file or the new one. A symlink's target is
    rewritten (not the link replaced by a file), and a file kept private stays private."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    # one temporary per writer: threads (the threads backend's ranks) that save the same file at once
    # would otherwise write into, and rename, one another's half-written temporary
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}-{threading.get_native_id()}-{_HOST}")
    try:
        with open(tmp, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a file too large: named after the file it was to be, which stays as it was
        raise OSError(e.errno, f"cannot write it ({e.strerror}); the file there is unchanged", str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def not_a_regular_file(path, pipe_ok=False):
    """What `path` is when it is not a regular file ("a directory", ...), else None (also when it does not
    exist: opening it says so). A device may never end (/dev/zero), and a pipe is read until its writer ends
    it, or for ever when it has none: pipe_ok for text a user may write on the fly (`--config <(...)`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or (pipe_ok and stat.S_ISFIFO(mode)):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a device or a socket" if pipe_ok else "a device, a pipe or a socket"


def load_safetensors(path):
    """(name -> array, metadata) from a safetensors file; a malformed file raises CheckpointError."""
    path = Path(path)
    try:
        what = not_a_regular_file(path)
        if what:
            raise CheckpointError(f"checkpoint {path} is not a regular file ({what})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the file")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON; nested too deep; a number of 4300+ digits
        raise CheckpointError(f"{path}: the header is not JSON that can be read ({brief(str(e))})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint: '__metadata__' is not a JSON object")
    body = memoryview(raw)[8 + n:]
    entries = []  # (begin, end, name, dtype, shape)
    for name, info in header.items():
        code = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(code, str) and code not in _DTYPES:  # BF16, U16, F8_E4M3, ...: the format has more
            raise CheckpointError(f"{path}: entry {name!r} has dtype {code}, which distbp does not read "
                                  f"(it reads {', '.join(_DTYPES)})")
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape, offsets = info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: entry {name!r} has a malformed description {info!r}") from None
        if not isinstance(shape, list) or not all(is_count(s) for s in shape) or len(shape) > MAX_DIMENSIONS:
            raise CheckpointError(f"{path}: entry {brief_repr(name)} has shape {brief_repr(shape)}: at most "
                                  f"{MAX_DIMENSIONS} dimensions, each an integer >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
            raise CheckpointError(f"{path}: entry {name!r} has data_offsets {offsets!r}: expected [begin, end], "
                                  "integers >= 0")
        begin, end = offsets
        # Python ints: a crafted shape must not wrap around as np.prod's int64 would
        size = math.prod(shape) * dtype.itemsize
        if not begin <= end <= len(body) or end - begin != size:
            raise CheckpointError(
                f"{path}: entry {name!r} has byte range {begin}..{end} that does not fit its shape {shape} "
                f"and dtype {info['dtype']} ({size} bytes) in a data section of {len(body)} bytes"
            )
        if too_large_for_an_array(shape, dtype.itemsize):
            raise CheckpointError(f"{path}: entry {brief_repr(name)} has shape {brief_repr(shape)}, too large for an "
                                  "array")
        entries.append((begin, end, name, dtype, tuple(shape)))
    _check_layout(path, entries, len(body))
    _check_checksum(path, header, metadata, body)  # after the layout, whose messages say more
    arrays = {}
    for begin, end, name, dtype, shape in entries:
        arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return arrays, metadata


MAX_DIMENSIONS = 64  # numpy's limit


def too_large_for_an_array(shape, itemsize):
    """Whether numpy refuses an array of this shape, even one holding no bytes (a 0 beside 2**62)."""
    return len(shape) > MAX_DIMENSIONS or math.prod(s for s in shape if s) * itemsize >= 2 ** 63


def brief(text, limit=80):
    """text cut short: an error message that quotes a file, or what a client sent, stays one readable line
    (and within what gRPC carries)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def brief_repr(value, limit=80):
    return brief(repr(value), limit)


def is_count(value):
    """An integer >= 0, and not a bool (JSON's true would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path, entries, data_bytes):
    """The format requires the byte ranges to tile the data section exactly: no overlap (two arrays sharing
    bytes), no gap and no trailing bytes (data no entry accounts for, as a damaged or tampered file has)."""
    covered, previous = 0, None
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < covered:
            raise CheckpointError(f"{path}: entry {name!r} (bytes {begin}..{end}) overlaps entry {previous!r} "
                                  f"(which ends at byte {covered})")
        if begin > covered:
            after = f"after entry {previous!r}" if previous is not None else "at the start of the data"
            raise CheckpointError(f"{path}: entry {name!r} starts at byte {begin}, leaving bytes {covered}..{begin} "
                                  f"{after} unaccounted for")
        covered, previous = end, name
    if covered != data_bytes:
        after = f"after the last entry {previous!r}" if previous is not None else "with no entries"
        raise CheckpointError(f"{path}: {data_bytes - covered} trailing bytes in the data section {after}")
