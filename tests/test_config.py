"""The training configuration: TOML files, CLI overrides, validation errors, model defaults."""

import dataclasses

import pytest

from distbp.cli import build_parser, config_from_args
from distbp.train.config import FIELDS, MODEL_DEFAULTS, Config, ConfigError, load_toml, make_config, to_dict


def config_from(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading ---------------------------------------------------------------------------------------------


def test_flat_toml(tmp_path):
    path = write(tmp_path, 'model = "mlp"\nlr = 0.02\nepochs = 3\nhidden = [64, 32]\nresume = true\n'
                           'checkpoint = "ck.safetensors"\n')
    assert load_toml(path) == {"model": "mlp", "lr": 0.02, "epochs": 3, "hidden": [64, 32], "resume": True,
                               "checkpoint": "ck.safetensors"}
    cfg = config_from(["--config", str(path)])
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.hidden, cfg.resume) == ("mlp", 0.02, 3, (64, 32), True)
    assert cfg.checkpoint == "ck.safetensors"


def test_toml_with_sections(tmp_path):
    path = write(tmp_path, 'model = "mlp"\n\n[optim]\noptimizer = "adam"\nlr = 0.005\nweight_decay = 1e-4\n\n'
                           '[data]\ndataset = "synthetic"\nsynthetic_size = 500\nbatch_size = 16\n')
    cfg = config_from(["--config", str(path)])
    assert cfg.optimizer == "adam" and cfg.lr == 0.005 and cfg.weight_decay == 1e-4
    assert cfg.dataset == "synthetic" and cfg.synthetic_size == 500 and cfg.batch_size == 16
    assert cfg.epochs == MODEL_DEFAULTS["mlp"]["epochs"]


def test_int_accepted_for_float(tmp_path):
    cfg = config_from(["--config", str(write(tmp_path, "lr = 1\nmomentum = 0\n"))])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.momentum == 0.0 and isinstance(cfg.momentum, float)


def test_cli_overrides_win_over_file(tmp_path):
    path = write(tmp_path, 'lr = 0.5\nepochs = 7\nbatch_size = 8\nhidden = [10]\nresume = true\n'
                           '[x]\nschedule = "step"\n')
    cfg = config_from(["--config", str(path), "--lr", "0.25", "--hidden", "20,30", "--no-resume",
                       "--schedule", "constant"])
    assert cfg.lr == 0.25 and cfg.hidden == (20, 30) and cfg.resume is False and cfg.schedule == "constant"
    assert cfg.epochs == 7 and cfg.batch_size == 8  # what the options leave alone comes from the file


def test_defaults_without_file():
    cfg = config_from([])
    for f in FIELDS:
        expected = MODEL_DEFAULTS["mlp"].get(f.name, f.default)
        assert getattr(cfg, f.name) == expected, f.name
    assert to_dict(cfg)["hidden"] == [128]
    assert set(to_dict(cfg)) == {f.name for f in FIELDS}


def test_config_is_frozen():
    cfg = make_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


# --- model defaults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODEL_DEFAULTS))
def test_model_defaults_fill_unset_keys(model):
    cfg = make_config({"model": model})
    for key, value in MODEL_DEFAULTS[model].items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("model", sorted(MODEL_DEFAULTS))
def test_model_defaults_never_override_set_keys(model, tmp_path):
    cfg = make_config({"model": model, "lr": 0.777, "optimizer": "adamw"})
    assert cfg.lr == 0.777 and cfg.optimizer == "adamw"
    assert cfg.epochs == MODEL_DEFAULTS[model]["epochs"]
    # set in the file, defaults for the model named on the command line
    path = write(tmp_path, "epochs = 2\n")
    cfg = config_from(["--config", str(path), "--model", model])
    assert cfg.epochs == 2
    assert cfg.lr == MODEL_DEFAULTS[model]["lr"] and cfg.optimizer == MODEL_DEFAULTS[model]["optimizer"]


def test_file_model_defaults_follow_cli_model(tmp_path):
    # the file picks cnn and leaves lr unset; the command line switches to charlm: charlm's lr, not cnn's
    path = write(tmp_path, 'model = "cnn"\n')
    cfg = config_from(["--config", str(path), "--model", "charlm"])
    assert cfg.model == "charlm" and cfg.lr == MODEL_DEFAULTS["charlm"]["lr"]
    assert cfg.optimizer == MODEL_DEFAULTS["charlm"]["optimizer"]


# --- errors ----------------------------------------------------------------------------------------------


def _toml_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config_from(["--config", str(path)])
    msg = str(err.value)
    assert str(path) in msg, f"the message does not name the file: {msg}"
    return msg


def test_a_key_set_in_two_sections_is_refused(tmp_path):
    path = write(tmp_path, "lr = 0.1\n[optim]\nlr = 0.2\n[model]\nhidden = [8]\n")
    with pytest.raises(ConfigError, match=r"'lr' is set both in the top level and in \[optim\]"):
        load_toml(path)


def test_unknown_key_with_suggestion(tmp_path):
    msg = _toml_error(tmp_path, "lrr = 0.1\n")
    assert "'lrr'" in msg and "unknown" in msg and "did you mean 'lr'" in msg


def test_unknown_key_in_section_with_suggestion(tmp_path):
    msg = _toml_error(tmp_path, "[optim]\nbatch-size = 4\n")
    assert "'batch-size'" in msg and "did you mean 'batch_size'" in msg


def test_unknown_key_without_suggestion(tmp_path):
    msg = _toml_error(tmp_path, "zzzzqqqq = 1\n")
    assert "'zzzzqqqq'" in msg and "did you mean" not in msg


@pytest.mark.parametrize("text, key, words", [
    ('lr = "0.1"', "lr", ["number", "'0.1'"]),
    ("epochs = 2.5", "epochs", ["integer", "2.5"]),
    ("epochs = true", "epochs", ["integer", "True"]),
    ("batch_size = false", "batch_size", ["integer"]),
    ("lr = true", "lr", ["number"]),
    ('resume = "yes"', "resume", ["true or false"]),
    ("resume = 1", "resume", ["true or false"]),
    ("model = 3", "model", ["string"]),
    ("hidden = 64.0", "hidden", ["list"]),
    ("hidden = [64.5]", "hidden", ["integer"]),
    ('hidden = ["a"]', "hidden", ["integer"]),
    ("hidden = []", "hidden", ["list"]),
], ids=lambda v: v if isinstance(v, str) and "=" in v else None)
def test_wrong_type(tmp_path, text, key, words):
    msg = _toml_error(tmp_path, text + "\n")
    assert f"'{key}'" in msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("text, key", [
    ("lr = 0", "lr"),
    ("lr = -0.1", "lr"),
    ("epochs = -1", "epochs"),
    ("epochs = 0", "epochs"),
    ("dropout = 1.0", "dropout"),
    ("dropout = 1.5", "dropout"),
    ("dropout = -0.1", "dropout"),
    ("batch_size = 0", "batch_size"),
    ("hidden = [64, 0]", "hidden"),
    ("momentum = 1.5", "momentum"),
    ("max_steps = -3", "max_steps"),
    ("lr = nan", "lr"),  # nan passes every comparison
    ("timeout = nan", "timeout"),
    ("grad_clip = inf", "grad_clip"),
])
def test_out_of_range(tmp_path, text, key):
    msg = _toml_error(tmp_path, text + "\n")
    assert f"'{key}'" in msg and "must be" in msg


def test_nan_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match="'lr' must be a finite number, got nan"):
        config_from(["--lr", "nan"])


def test_in_range_edges_accepted():
    cfg = make_config({"model": "charlm", "dropout": 0.5, "lr": 1e-9, "epochs": 1, "max_steps": 0})
    assert make_config({"momentum": 1.0}).momentum == 1.0
    assert cfg.dropout == 0.5 and cfg.lr == 1e-9 and cfg.epochs == 1


@pytest.mark.parametrize("text, key, value", [
    ('model = "resnet"', "model", "resnet"),
    ('optimizer = "rmsprop"', "optimizer", "rmsprop"),
    ('schedule = "linear"', "schedule", "linear"),
    ('dataset = "cifar"', "dataset", "cifar"),
    ('progress = "fancy"', "progress", "fancy"),
])
def test_bad_choice(tmp_path, text, key, value):
    msg = _toml_error(tmp_path, text + "\n")
    assert f"'{key}'" in msg and value in msg
    choices = next(f.choices for f in FIELDS if f.name == key)
    assert all(c in msg for c in choices), "the message lists the allowed values"


def test_bad_choice_via_make_config():
    with pytest.raises(ConfigError, match="'model'.*mlp, cnn, charlm.*'resnet'"):
        make_config({"model": "resnet"})


def test_malformed_toml(tmp_path):
    msg = _toml_error(tmp_path, "lr = = 0.1\n[unclosed\n")
    assert "not valid TOML" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from(["--config", str(tmp_path / "nope.toml")])
    assert "nope.toml" in str(err.value) and "does not exist" in str(err.value)


def test_cli_values_are_validated_too():
    with pytest.raises(ConfigError, match="'lr'"):
        config_from(["--lr", "-1"])
    with pytest.raises(ConfigError, match="'dropout'"):
        config_from(["--dropout", "1"])
    with pytest.raises(ConfigError, match="'hidden'"):
        config_from(["--hidden", "0,4"])


def test_file_error_reported_even_if_cli_overrides_key(tmp_path):
    # the file is checked on its own first, so its mistake is named with the file
    path = write(tmp_path, 'lr = "fast"\n')
    with pytest.raises(ConfigError) as err:
        config_from(["--config", str(path), "--lr", "0.1"])
    assert str(path) in str(err.value) and "'lr'" in str(err.value)


def test_null_for_required_key():
    with pytest.raises(ConfigError, match="'batch_size'"):
        make_config({"batch_size": None})
    assert make_config({"checkpoint": None}).checkpoint is None


def test_every_field_is_a_config_attribute():
    names = {f.name for f in dataclasses.fields(Config)}
    assert names == {f.name for f in FIELDS}
    assert len(FIELDS) == len(names)  # no key declared twice


# --- keys that nothing would read ---------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"model": "cnn", "hidden": [256, 128]}, "'hidden' is for the mlp model; the model is cnn"),
    ({"dropout": 0.5}, "'dropout' is for the charlm model; the model is mlp"),
    ({"model": "cnn", "n_heads": 8}, "'n_heads' is for the charlm model; the model is cnn"),
    ({"model": "cnn", "text_file": "small.txt"}, "'text_file' is for the text data set; the data set is digits"),
    ({"data_dir": "mnist"}, "'data_dir' is for the idx data set; the data set is digits"),
    ({"dataset": "digits", "synthetic_size": 500}, "'synthetic_size' is for the synthetic data set"),
    ({"optimizer": "adam", "momentum": 0.5}, "'momentum' is for the sgd optimizer; the optimizer is adam"),
    ({"model": "charlm", "momentum": 0.5}, "'momentum' is for the sgd optimizer; the optimizer is adam"),
])
def test_a_key_that_nothing_reads_is_refused_not_ignored(values, message):
    # they used to train as if not given
    with pytest.raises(ConfigError, match=message):
        make_config(values)


def test_keys_at_their_defaults_and_keys_that_apply_pass():
    make_config({"model": "cnn", "hidden": [128], "momentum": 0.9, "dropout": 0.0})
    make_config({"model": "charlm", "dropout": 0.1, "n_heads": 2, "d_model": 32, "max_chars": 5000})
    make_config({"dataset": "synthetic", "synthetic_size": 500, "optimizer": "sgd", "momentum": 0.5})


def test_one_integer_is_a_list_of_one_in_toml_as_on_the_command_line(tmp_path):
    path = write(tmp_path, "hidden = 256\n")
    assert config_from(["--config", str(path)]).hidden == (256,)


@pytest.mark.parametrize("values, backend", [({"compress": "fp16", "backend": "local"}, "local"),
                                             ({"bucket_cap_mb": 5.0, "backend": "local"}, "local"),
                                             ({"allow_unused": True, "ps": "127.0.0.1:1"}, "ps"),
                                             ({"timeout": 10.0, "backend": "ps", "ps": "127.0.0.1:1"}, "ps")])
def test_all_reduce_options_without_an_all_reduce_are_refused(values, backend):
    from distbp.train.launch import resolve_backend

    with pytest.raises(ConfigError, match=f"of the all-reduce \\(backends threads and mpi\\), but the backend is {backend}"):
        resolve_backend(make_config(values))
    assert resolve_backend(make_config({**values, "backend": "threads", "ps": None})) == "threads"


def test_all_reduce_options_with_the_backend_left_to_auto_pass_on_one_rank():
    # a sweep over 1, 2, 4 ranks with one option list: one rank is the local backend
    from distbp.train.launch import resolve_backend

    assert resolve_backend(make_config({"timeout": 600.0, "compress": "fp16"})) == "local"


def test_a_config_file_is_checked_with_the_options_that_choose_its_model(tmp_path):
    # the file used to be checked alone, as if for the default model, data set and optimizer
    path = write(tmp_path, "d_model = 32\nn_heads = 2\nmomentum = 0.5\n")
    cfg = config_from(["--config", str(path), "--model", "charlm", "--optimizer", "sgd"])
    assert (cfg.d_model, cfg.momentum) == (32, 0.5)
    path = write(tmp_path, "synthetic_size = 500\n", "synthetic.toml")
    assert config_from(["--config", str(path), "--dataset", "synthetic"]).synthetic_size == 500
    with pytest.raises(ConfigError, match="'synthetic_size' is for the synthetic data set; the data set is digits"):
        config_from(["--config", str(path)])
