"""Checkpoints: one safetensors file, written atomically, that runs no code when read.

Arrays (model parameters and buffers, optimizer state) are stored in the safetensors layout: an 8-byte
little-endian header length, a JSON header naming each array's dtype, shape and byte range, then the raw
bytes. Everything else (step, epoch, position in the epoch, RNG states, schedule, configuration, the
model's signature) is JSON in the header's "__metadata__". Writing goes to a temporary file in the same
directory, is flushed to disk, then renamed over the old file: a crash at any point leaves either the old
checkpoint or the new one, never a torn file.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np

FORMAT = "distbp-checkpoint-1"

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


def model_signature(model):
    return {name: [list(p.data.shape), str(p.data.dtype)] for name, p in model.named_parameters()}


def save_checkpoint(path, model, optimizer, state):
    """Model and optimizer arrays plus the JSON-able `state` (step, epoch, RNG states, ...)."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, np.ndarray):
                arrays[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {
        "format": FORMAT,
        "signature": model_signature(model),
        "optimizer_type": type(optimizer).__name__,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "state": state,
    }
    save_safetensors(path, arrays, {"distbp": json.dumps(meta)})


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer from `path` and return the saved `state`.

    A checkpoint of another model (different parameter names or shapes) is refused, naming the first
    difference, before anything is changed.
    """
    arrays, metadata = load_safetensors(path)
    try:
        meta = json.loads(metadata["distbp"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a distbp checkpoint (no distbp metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT}")
    missing = [k for k in ("signature", "optimizer", "state") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint metadata: no {missing[0]!r}")
    saved_opt = meta.get("optimizer_type")
    if saved_opt is not None and saved_opt != type(optimizer).__name__:
        raise CheckpointError(
            f"{path}: checkpoint of a run with optimizer {saved_opt}, this run uses {type(optimizer).__name__}"
        )
    saved, own = meta["signature"], model_signature(model)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: the model signature is not an object")
    for name in own:
        if name not in saved:
            raise CheckpointError(f"{path}: checkpoint of a different model: it has no parameter {name!r}")
        if saved[name] != own[name]:
            raise CheckpointError(
                f"{path}: checkpoint of a different model: {name!r} is {saved[name][0]} {saved[name][1]} "
                f"there, {own[name][0]} {own[name][1]} here"
            )
    extra = [n for n in saved if n not in own]
    if extra:
        raise CheckpointError(f"{path}: checkpoint of a different model: it has extra parameter {extra[0]!r}")
    try:
        model_arrays = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        opt_state = {}
        for key, value in arrays.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        for idx, entries in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(entries)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["optimizer"]["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})") from None
    model_backup, optimizer_backup = model.state_dict(), optimizer.state_dict()
    try:
        model.load_state_dict(model_arrays)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        # either load may fail after the other succeeded: put both back, so a refused checkpoint changes nothing
        model.load_state_dict(model_backup)
        optimizer.load_state_dict(optimizer_backup)
        raise CheckpointError(f"{path}: does not fit this run: {e}") from None
    return meta["state"]
