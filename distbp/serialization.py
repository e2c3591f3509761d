"""safetensors files, written atomically and read without running any code.

The layout: an 8-byte little-endian header length, a JSON header naming each array's dtype, shape and
byte range (plus free-form string "__metadata__"), then the raw little-endian bytes. Writing goes to a
temporary file in the same directory, is flushed to disk, then renamed over the old file: a crash at any
point leaves either the old file or the new one, never a torn one.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit, with the reason."""


def save_safetensors(path, arrays, metadata=None):
    """Write name -> array as a safetensors file, atomically (temporary file, fsync, rename)."""
    path = Path(path)
    header = {}
    offset = 0
    blobs = []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        code = _CODES.get(arr.dtype.newbyteorder("="))
        if code is None:
            raise CheckpointError(f"cannot store {name}: dtype {arr.dtype} has no safetensors code")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for data in blobs:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
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


def load_safetensors(path):
    """(name -> array, metadata) from a safetensors file; a malformed file raises CheckpointError."""
    path = Path(path)
    try:
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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint: '__metadata__' is not a JSON object")
    body = memoryview(raw)[8 + n:]
    arrays = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if any(s < 0 for s in shape):
                raise ValueError("negative dimension")
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: entry {name!r} has a malformed description {info!r}") from None
        if not 0 <= begin <= end <= len(body) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: entry {name!r} has byte range {begin}..{end} that does not fit")
        arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return arrays, metadata
