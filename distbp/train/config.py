"""Training configuration: one schema, read from a TOML file and overridden on the command line.

Every key is declared once in FIELDS (type, default, bounds, help); the TOML reader, the CLI options and
the validation are all derived from it, so a key cannot exist in one place and not another.
"""

import difflib
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..serialization import brief, not_a_regular_file


class ConfigError(ValueError):
    """A configuration problem, naming the key and what is wrong with it."""


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: object
    help: str
    choices: tuple = ()
    minimum: float = None
    exclusive_minimum: bool = False
    maximum: float = None
    nullable: bool = False
    is_list: bool = False


FIELDS = (
    # what to train
    Field("model", str, "mlp", "model to train", choices=("mlp", "cnn", "charlm")),
    Field("dataset", str, None, "data set (default: digits; text for charlm)",
          choices=("digits", "idx", "text", "synthetic"), nullable=True),
    Field("data_dir", str, None, "directory of MNIST-format IDX files (dataset=idx)", nullable=True),
    Field("text_file", str, None, "UTF-8 text file to train charlm on (default: Python's stdlib sources)",
          nullable=True),
    Field("hidden", int, (128,), "mlp hidden layer widths, e.g. 256,128", minimum=1, is_list=True),
    Field("synthetic_size", int, 10_000, "examples in the synthetic data set", minimum=2, maximum=10**9),
    # charlm
    Field("block_size", int, 64, "charlm context length in characters", minimum=2),
    Field("d_model", int, 64, "charlm embedding width", minimum=1),
    Field("n_layers", int, 2, "charlm transformer blocks", minimum=1),
    Field("n_heads", int, 4, "charlm attention heads", minimum=1),
    Field("dropout", float, 0.0, "dropout probability (charlm)", minimum=0.0, maximum=0.99),
    Field("sample_length", int, 300, "characters charlm samples after training", minimum=0),
    Field("max_chars", int, 400_000, "characters of text to read (text data set)", minimum=100, maximum=10**12),
    # optimisation
    Field("epochs", int, None, "passes over the training data (default: the model's)", minimum=1, nullable=True),
    Field("max_steps", int, 0, "stop after this many steps in all (0: no limit)", minimum=0),
    Field("batch_size", int, 32, "examples per step (per rank)", minimum=1),
    Field("optimizer", str, None, "optimizer (default: the model's)", choices=("sgd", "adam", "adamw"),
          nullable=True),
    Field("lr", float, None, "learning rate (default: the model's)", minimum=0.0, exclusive_minimum=True,
          nullable=True),
    Field("momentum", float, 0.9, "SGD momentum", minimum=0.0, maximum=1.0),
    Field("weight_decay", float, 0.0, "weight decay", minimum=0.0),
    Field("schedule", str, "cosine", "learning-rate schedule after the warm-up (cosine falls to 0 at the end; step "
          "is 10x lower after each third of the steps)", choices=("constant", "cosine", "step")),
    Field("warmup_steps", int, 0, "linear warm-up steps before the schedule", minimum=0),
    Field("grad_clip", float, 0.0, "clip the global gradient norm to this (0: off)", minimum=0.0),
    Field("seed", int, 0, "seed for initialisation, shuffling and dropout", minimum=0),
    Field("threads", int, 1, "BLAS threads per process (0: the library's default); small layers run "
          "fastest on one", minimum=0),
    # data parallelism
    Field("backend", str, "auto", "how ranks combine gradients: local (one process), threads (world_size "
          "ranks in this process), mpi (ranks started by mpiexec), ps (parameter servers); auto: ps when 'ps' "
          "is given, mpi under mpiexec, else local",
          choices=("auto", "local", "threads", "mpi", "ps")),
    Field("world_size", int, 1, "ranks for the threads backend", minimum=1),
    Field("bucket_cap_mb", float, 25.0, "megabytes of gradients per all-reduce bucket", minimum=0.0,
          exclusive_minimum=True),
    Field("allow_unused", bool, False, "treat parameters that get no gradient in a step as zero"),
    Field("compress", str, "none", "exchange gradients as float16 (fp16) or as they are (none)",
          choices=("none", "fp16")),
    Field("timeout", float, 300.0, "seconds a collective may wait for the other ranks before the job "
          "stops", minimum=0.0, exclusive_minimum=True),
    Field("trace", str, None, "write a Chrome trace (Perfetto) of the first 50 steps to this file",
          nullable=True),
    # parameter server (backend = ps)
    Field("ps", str, None, "parameter-server addresses HOST:PORT[,HOST:PORT...], one per shard in shard "
          "order (backend ps)", nullable=True),
    Field("ps_token", str, None, "shared token for the parameter servers", nullable=True),
    Field("ps_tls_ca", str, None, "CA certificate to verify the parameter servers' TLS certificates",
          nullable=True),
    Field("ps_tls_cert", str, None, "client certificate for mutual TLS with the parameter servers", nullable=True),
    Field("ps_tls_key", str, None, "client private key for mutual TLS", nullable=True),
    Field("ps_worker_id", int, -1, "rejoin as this worker id (a restarted worker); -1: any free id", minimum=-1),
    Field("ps_retry_seconds", float, 60.0, "how long a worker retries while a server is unavailable",
          minimum=0.0),
    # bookkeeping
    Field("eval_every", int, 0, "evaluate every N steps (0: at the end of each epoch)", minimum=0),
    Field("log_every", int, 50, "log a line every N steps when not on a terminal", minimum=1),
    Field("checkpoint", str, None, "checkpoint file to write (and to resume from)", nullable=True),
    Field("checkpoint_every", int, 0, "write the checkpoint every N steps (0: at the end of each epoch)",
          minimum=0),
    Field("resume", bool, False, "continue from --checkpoint if it exists"),
    Field("init_from", str, None, "start a new run from the weights of this checkpoint (the optimizer, "
          "schedule and position start afresh; with resume, only when there is nothing to resume)",
          nullable=True),
    Field("metrics", str, None, "write metrics as JSON lines to this file", nullable=True),
    Field("progress", str, "auto", "progress display: a bar on a terminal, else plain lines (auto); none "
          "prints nothing but errors", choices=("auto", "bar", "plain", "none")),
)

_BY_NAME = {f.name: f for f in FIELDS}


def _type_name(f):
    base = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[f.type]
    return f"a list of {base.split(' ', 1)[1]}s" if f.is_list else base


def _coerce_scalar(f, value, where):
    ok = False
    if f.type is bool:
        ok = isinstance(value, bool)
    elif f.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif f.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif f.type is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: '{f.name}' must be {_type_name(f)}, got {value!r} ({type(value).__name__})")
    if f.type is str and not value.strip():  # an unset shell variable: the output or input would be lost silently
        raise ConfigError(f"{where}: '{f.name}' is empty; leave it out for none")
    if f.type is float and not math.isfinite(value):  # nan passes every bound check
        raise ConfigError(f"{where}: '{f.name}' must be a finite number, got {value}")
    if f.choices and value not in f.choices:
        raise ConfigError(f"{where}: '{f.name}' must be one of {', '.join(f.choices)}; got {value!r}")
    if f.minimum is not None and (value < f.minimum or (f.exclusive_minimum and value == f.minimum)):
        rel = ">" if f.exclusive_minimum else ">="
        raise ConfigError(f"{where}: '{f.name}' must be {rel} {f.minimum}, got {value}")
    if f.maximum is not None and value > f.maximum:
        raise ConfigError(f"{where}: '{f.name}' must be <= {f.maximum}, got {value}")
    return value


def validate_value(name, value, where="config"):
    """The value for key `name`, checked against its declared type and bounds."""
    f = _BY_NAME.get(name)
    if f is None:
        near = difflib.get_close_matches(name, _BY_NAME, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{where}: unknown key '{name}'{hint}")
    if value is None:
        if f.nullable:
            return None
        raise ConfigError(f"{where}: '{name}' cannot be empty")
    if f.is_list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # hidden = 256 in TOML, as --hidden 256 on the command line
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where}: '{name}' must be {_type_name(f)}, got {value!r}")
        return tuple(_coerce_scalar(f, v, where) for v in value)
    return _coerce_scalar(f, value, where)


def _config_class():
    specs = [(f.name, object, field(default=f.default)) for f in FIELDS]
    from dataclasses import make_dataclass

    return make_dataclass("Config", specs, frozen=True)


Config = _config_class()
Config.__doc__ = "A validated training configuration (see distbp.train.config.FIELDS)."


def validate_values(values, where="config"):
    """Each key and value of a mapping checked on its own (a config file's, before options are added to it)."""
    return {name: validate_value(name, value, where) for name, value in (values or {}).items()}


def make_config(values=None, where="config"):
    """A Config from a mapping of keys to values, every key and value checked, and every key that is set
    read by the model, data set and optimizer chosen."""
    config = resolve(Config(**validate_values(values, where)))
    check_applies(config)
    return config


# Keys that only one model, data set or optimizer reads: given for another, they would be ignored silently.
# (The backend's keys are checked with the backend: see launch.resolve_backend.)
_MODEL_KEYS = {"hidden": "mlp", "block_size": "charlm", "d_model": "charlm", "n_layers": "charlm",
               "n_heads": "charlm", "dropout": "charlm", "sample_length": "charlm"}
_DATASET_KEYS = {"data_dir": "idx", "text_file": "text", "max_chars": "text", "synthetic_size": "synthetic"}


def default_dataset(model):
    """The data set a model trains on when none is given."""
    return "text" if model == "charlm" else "digits"


def keys_given(config, keys):
    """Those of `keys` that `config` sets to other than their defaults."""
    default = Config()
    return [k for k in keys if getattr(config, k) != getattr(default, k)]


def check_applies(config):
    """Refuse a key set to other than its default where nothing reads it (--hidden with the cnn, say)."""
    dataset = config.dataset or default_dataset(config.model)
    for key in keys_given(config, _MODEL_KEYS):
        if config.model != _MODEL_KEYS[key]:
            raise ConfigError(f"config: '{key}' is for the {_MODEL_KEYS[key]} model; the model is {config.model}")
    for key in keys_given(config, _DATASET_KEYS):
        if dataset != _DATASET_KEYS[key]:
            raise ConfigError(f"config: '{key}' is for the {_DATASET_KEYS[key]} data set; the data set is {dataset}")
    if config.optimizer != "sgd" and keys_given(config, ["momentum"]):
        raise ConfigError(f"config: 'momentum' is for the sgd optimizer; the optimizer is {config.optimizer}")


def load_toml(path):
    """The key/value mapping of a TOML config file (flat, or with [sections] that are merged)."""
    path = Path(path)
    what = not_a_regular_file(path, pipe_ok=True)
    if what:
        raise ConfigError(f"config file {path} is not a regular file or a pipe ({what})")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:  # nested too deep; a number of 4300+ digits
        raise ConfigError(f"config file {path} is not valid TOML that can be read: {brief(str(e))}") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    flat, where = {}, {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            here = f"[{key}]" if isinstance(value, dict) else "the top level"
            if k in flat:  # sections are merged: the same key twice would silently take the last one
                raise ConfigError(f"config file {path}: '{k}' is set both in {where[k]} and in {here}")
            flat[k], where[k] = v, here
    return flat


# What a key left unset means for each model: tuned so that `distbp train --model M` does well quickly.
MODEL_DEFAULTS = {
    "mlp": {"epochs": 20, "optimizer": "sgd", "lr": 0.1},
    "cnn": {"epochs": 10, "optimizer": "sgd", "lr": 0.1},
    "charlm": {"epochs": 3, "optimizer": "adam", "lr": 3e-3},
}


def resolve(config):
    """The config with every key left to the model's choice (None) filled in from MODEL_DEFAULTS."""
    filled = {k: v for k, v in MODEL_DEFAULTS[config.model].items() if getattr(config, k) is None}
    return replace(config, **filled) if filled else config


def to_dict(config):
    return {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in fields(config)}


def check_writable(what, path):
    """Refuse an output file that cannot be written (its missing parent directories are made when written),
    before any work is done; `what` names it in the message."""
    target = Path(path)
    what_it_is = not_a_regular_file(target)  # replaced or written to, a device or a FIFO would be lost or hang
    if what_it_is == "a directory":
        raise ConfigError(f"{what} is {path}, which is a directory, not a file")
    if what_it_is:
        raise ConfigError(f"{what} is {path}, which is not a regular file ({what_it_is})")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} is {path}, but {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} is {path}, but {parent} is not writable")
    try:  # os.access says yes to root anywhere: a read-only file system or /proc refuses only a real file
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"{what} is {path}, but no file can be made in {parent} ({e.strerror})") from None


def _file_identity(path):
    """What makes a file itself under any of its names (symlinks and hard links alike)."""
    try:
        stat = os.stat(path)
        return stat.st_dev, stat.st_ino
    except OSError:
        return os.path.realpath(path)


# Files a run reads that no output may be; a new run's checkpoint may replace the one it starts from.
INPUT_KEYS = {"init_from": ("metrics", "trace"), "text_file": ("checkpoint", "metrics", "trace")}


def check_outputs(config, keys):
    """check_writable for each of the config's output files that is set, and refuse two of them that are one
    file (each is written whole over what the other wrote), or one that is a file the run reads."""
    seen = {}
    for key in keys:
        path = getattr(config, key)
        if not path:
            continue
        check_writable(f"config: '{key}'", path)
        identity = _file_identity(path)
        if identity in seen:
            raise ConfigError(f"config: '{seen[identity]}' and '{key}' are the same file ({path}): give each its own")
        seen[identity] = key
    for key, outputs in INPUT_KEYS.items():
        path = getattr(config, key, None)
        if path:
            check_not_an_output(config, path, f"'{key}'", [k for k in keys if k in outputs])


def same_file(a, b):
    """Whether two paths name one file (through symbolic or hard links too)."""
    return _file_identity(a) == _file_identity(b)


def check_not_an_output(config, path, what, keys):
    """Refuse an output (the config's `keys`) that is `path`, a file the run reads: it would be destroyed."""
    for key in keys:
        if getattr(config, key, None) and same_file(getattr(config, key), path):
            raise ConfigError(f"config: '{key}' is {what} ({path}), which the run reads: writing it would "
                              f"destroy it; give '{key}' another file")


def check_pem(what, path):
    """Refuse a TLS certificate or key file that is missing or not PEM, naming it (before any connection)."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in text:
        raise ConfigError(f"{what} {path} is not a PEM file (no -----BEGIN line)")


# Keys a resumed run (or a restarted parameter server) must share with its checkpoint: the data and its order,
# the optimizer's settings, which the checkpoint's optimizer state and schedule would overwrite, and the one
# model setting that shapes no parameter (charlm's heads: other heads read the same weights differently).
# (Another optimizer is refused by load_checkpoint; the parameter server compares it as a setting.)
# (not max_chars: the text read is compared by its fingerprint, and a file shorter than both limits is the same)
RESUME_KEYS = ("dataset", "synthetic_size", "block_size", "batch_size", "seed",
               "lr", "momentum", "weight_decay", "n_heads")
# Settings a parameter-server worker must share with the servers, which build the optimizer and schedule
# from their own copy of the options: checked when the worker registers.
PS_SHARED_KEYS = ("dataset", "synthetic_size", "block_size", "epochs", "max_steps", "batch_size",
                  "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_steps", "seed", "n_heads")


def ps_settings(config):
    """The PS_SHARED_KEYS of `config` as they take effect (see effective_settings)."""
    return effective_settings(to_dict(config), PS_SHARED_KEYS)


def effective_settings(values, keys):
    """`keys` of a configuration's to_dict() as they take effect, so that equivalent runs compare equal:
    left-to-default values resolved (the data set, the model's optimizer and learning rate), and keys that
    do not apply dropped (synthetic_size without the synthetic data, block_size and max_chars without
    text, momentum without SGD)."""
    v = dict(values)
    model = v.get("model") or "mlp"
    if v.get("dataset") is None:
        v["dataset"] = default_dataset(model)
    for key, default in MODEL_DEFAULTS.get(model, {}).items():
        if v.get(key) is None:
            v[key] = default
    out = {key: v.get(key) for key in keys}
    dropped = [("synthetic_size", v["dataset"] != "synthetic"), ("max_chars", v["dataset"] != "text"),
               ("block_size", v["dataset"] != "text"), ("momentum", v.get("optimizer") != "sgd"),
               ("n_heads", model != "charlm")]
    for key, applies_not in dropped:
        if applies_not:
            out.pop(key, None)
    return out
