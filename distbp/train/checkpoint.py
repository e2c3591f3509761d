"""Checkpoints: one safetensors file, written atomically, that runs no code when read.

Arrays (model parameters and buffers, optimizer state) are stored in the safetensors layout: an 8-byte
little-endian header length, a JSON header naming each array's dtype, shape and byte range, then the raw
bytes. Everything else (step, epoch, position in the epoch, RNG states, schedule, configuration, the
model's signature) is JSON in the header's "__metadata__". Writing goes to a temporary file in the same
directory, is flushed to disk, then renamed over the old file: a crash at any point leaves either the old
checkpoint or the new one, never a torn file.
"""

import json

import numpy as np

from ..serialization import (  # noqa: F401
    CheckpointError, brief_repr, check_finite, is_count, load_safetensors, save_safetensors,
)

FORMAT = "distbp-checkpoint-1"


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
    check_finite(path, arrays, "model/", writing=True)
    save_safetensors(path, arrays, {"distbp": json.dumps(meta)})


def _read(path):
    """(arrays, metadata) of a distbp checkpoint, its format and metadata checked."""
    arrays, metadata = load_safetensors(path)
    try:
        meta = json.loads(metadata["distbp"])
    except (KeyError, TypeError, ValueError, RecursionError):  # (JSON nested too deep, a number of 4300+ digits)
        raise CheckpointError(f"{path}: not a distbp checkpoint (no distbp metadata, as JSON that can be read)") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT}")
    missing = [k for k in ("signature", "optimizer", "state") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint metadata: no {missing[0]!r}")
    if not isinstance(meta["state"], dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: the saved state is not an object")
    stray = [name for name in arrays if not name.startswith(("model/", "optim/"))]
    if stray:  # a damaged name: the array it was would be missed without a word (optimizer state restarted)
        raise CheckpointError(f"{path}: damaged checkpoint: array {brief_repr(stray[0])} is neither the model's "
                              "nor the optimizer's")
    check_finite(path, arrays, "model/")
    return arrays, meta


def _check_model(path, meta, arrays, model):
    """Refuse a checkpoint of another model: parameter names, shapes and dtypes must be the same, in the
    saved signature and in the arrays themselves (load_state_dict would convert another dtype's bits)."""
    saved, own = meta["signature"], model_signature(model)
    if not isinstance(saved, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and isinstance(v[1], str)
            for v in saved.values()):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: the model signature is not "
                              "{name: [shape, dtype]}")
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
    for name, value in model.state_dict().items():  # the arrays as they are, beside what the signature says
        array = arrays.get(f"model/{name}")
        if array is not None and (array.dtype != value.dtype or array.shape != value.shape):
            raise CheckpointError(f"{path}: model/{name} is {array.dtype} {list(array.shape)} in the file, but "
                                  f"{value.dtype} {list(value.shape)} by its signature and here: a damaged file")


def _state_of(path, meta):
    state = meta.get("state", {})
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata (the state is not an object)")
    return state


def load_weights(path, model, check_state=None):
    """Only the model's parameters and buffers from a checkpoint, for a new run that starts from them
    (its optimizer, schedule and position start afresh). Checked like load_checkpoint's, check_state too."""
    arrays, meta = _read(path)
    if check_state is not None:
        check_state(_state_of(path, meta))
    _check_model(path, meta, arrays, model)
    try:
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit this model: {_reason(e)}") from None


def load_checkpoint(path, model, optimizer, check_state=None, check_first=None):
    """Restore model and optimizer from `path` and return the saved `state`.

    Everything is checked before anything changes: a checkpoint of another model (different parameter
    names or shapes), or with optimizer state the optimizer cannot use, is refused naming the first
    problem, and model and optimizer are left as they were. check_state(state), if given, is called
    after those checks and before any change: a caller that restores more from `state` (counters, a
    schedule) checks it there and raises CheckpointError to refuse the file. check_first(state), if given,
    is called before the model and optimizer checks: for settings whose difference would otherwise be
    reported as a shape that does not fit (a block size, a vocabulary).
    """
    arrays, meta = _read(path)
    if check_first is not None:  # it names the setting that differs, where the checks below name a shape
        check_first(_state_of(path, meta))
    saved_opt = meta.get("optimizer_type")
    if saved_opt is not None and saved_opt != type(optimizer).__name__:
        raise CheckpointError(
            f"{path}: checkpoint of a run with optimizer {saved_opt}, this run uses {type(optimizer).__name__}"
        )
    _check_model(path, meta, arrays, model)
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
    opt_state_dict = {"state": opt_state, "param_groups": groups}
    try:
        optimizer.check_state_dict(opt_state_dict)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit this run: {_reason(e)}") from None
    if check_state is not None:
        check_state(meta["state"])
    try:
        # checks every array before copying any, so a refusal here leaves the model as it was
        model.load_state_dict(model_arrays)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit this run: {_reason(e)}") from None
    optimizer.load_state_dict(opt_state_dict)  # checked above: cannot fail half-way
    return meta["state"]


def _reason(error):
    # str() of a KeyError is the repr of its argument, quotes and all
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)
