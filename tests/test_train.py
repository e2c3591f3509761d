"""The training service end to end: accuracy targets on digits, exact resume, charlm, the training step."""

import io
import json
import shutil

import numpy as np
import pytest

from distbp import nn
from distbp.train import CheckpointError, ConfigError, Trainer, load_checkpoint, make_config
from distbp.train.checkpoint import load_safetensors
from distbp.train.steps import LocalStep


def fit(**overrides):
    overrides.setdefault("progress", "none")
    trainer = Trainer(make_config(overrides))
    return trainer, trainer.fit()


def test_default_mlp_on_digits_reaches_97_percent():
    _, summary = fit()
    assert summary["test_accuracy"] >= 0.97, summary


@pytest.mark.parametrize("seed", [1, 2])
def test_mlp_accuracy_holds_for_other_seeds(seed):
    _, summary = fit(seed=seed)
    assert summary["test_accuracy"] >= 0.97, summary


def test_default_mlp_on_a_large_synthetic_set_learns_without_blowing_up():
    # the synthetic features have unit variance: with their old scale (variance 5) the default learning
    # rate sent the loss into the millions by step 1,000 of 100,000 examples
    _, summary = fit(dataset="synthetic", synthetic_size=30_000, epochs=1)
    assert summary["test_loss"] < 0.5 and summary["test_accuracy"] >= 0.95, summary


def test_cnn_on_digits_reaches_98_percent():
    _, summary = fit(model="cnn")
    assert summary["test_accuracy"] >= 0.98, summary


def test_charlm_trains_and_samples(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(400))
    corpus = tmp_path / "code.txt"
    corpus.write_text(text)
    trainer, summary = fit(model="charlm", text_file=str(corpus), block_size=32, d_model=32, n_heads=2,
                           n_layers=1, epochs=10, max_steps=150, batch_size=16, sample_length=60)
    assert summary["test_loss"] < 1.5  # from log(vocab) ~ 3.0 for an untrained model
    sample = summary["sample"]
    assert sample.startswith("def ") and len(sample) == len("def ") + 60
    assert set(sample) <= set(text)


def _params(model):
    return {name: p.data.copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,checkpoint_every", [("sgd", 0), ("adam", 7)])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, optimizer, checkpoint_every):
    common = dict(epochs=3, batch_size=64, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3,
                  warmup_steps=5, checkpoint_every=checkpoint_every)
    whole, _ = fit(**common)
    ckpt = tmp_path / "run.ckpt"
    # interrupted mid-epoch (23 steps of 23 per epoch * 3), then resumed from the checkpoint
    first, s1 = fit(**common, checkpoint=str(ckpt), max_steps=30)
    assert s1["steps"] == 30
    resumed, s2 = fit(**common, checkpoint=str(ckpt), resume=True)
    assert s2["steps"] == whole.step
    expected, got = _params(whole.model), _params(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # and the optimizer state too
    for a, b in zip(whole.optimizer.state.values(), resumed.optimizer.state.values()):
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_resume_with_dropout_replays_the_same_random_stream(tmp_path, tiny_charlm):
    common = tiny_charlm
    whole, _ = fit(**common)
    ckpt = tmp_path / "lm.ckpt"
    fit(**common, checkpoint=str(ckpt), max_steps=11)
    resumed, _ = fit(**common, checkpoint=str(ckpt), resume=True)
    for name, value in _params(whole.model).items():
        np.testing.assert_array_equal(_params(resumed.model)[name], value, err_msg=name)


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_checkpoint(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first, _ = fit(epochs=2, checkpoint=str(ckpt), max_steps=10)
    written = ckpt.read_bytes()
    again, summary = fit(epochs=2, checkpoint=str(ckpt), max_steps=10, resume=True)  # a requeued job
    assert again.step == 10 and summary["steps"] == 10
    assert ckpt.read_bytes() == written
    assert summary["test_accuracy"] > 0.2  # evaluated, not nan
    for name, value in _params(first.model).items():
        np.testing.assert_array_equal(_params(again.model)[name], value)


def test_a_diverged_run_keeps_the_last_good_checkpoint_and_fails(tmp_path):
    # the loss of the step whose update diverges was taken before the update: finite. The checkpoint due
    # then must not replace the good one with weights that cannot be resumed, and the run must not end well
    ckpt = tmp_path / "run.ckpt"
    fit(max_steps=2, checkpoint=str(ckpt))
    good = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="not written: model/.* holds non-finite values"):
        fit(lr=1e300, max_steps=1, checkpoint=str(ckpt), checkpoint_every=1)
    assert ckpt.read_bytes() == good
    with pytest.raises(FloatingPointError, match="test loss became nan at step 1"):
        fit(lr=1e300, max_steps=1)


def test_resume_compares_settings_as_they_take_effect(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    fit(epochs=2, checkpoint=str(ckpt), max_steps=5)  # dataset left to the default (digits)
    # the same run spelled out: accepted (keys that do not apply to it are refused, see test_config.py)
    again, _ = fit(epochs=2, checkpoint=str(ckpt), resume=True, dataset="digits", optimizer="sgd", lr=0.1,
                   max_steps=6)
    assert again.step == 6


@pytest.mark.parametrize("key,value", [("batch_size", 16), ("seed", 7), ("dataset", "synthetic")])
def test_resume_with_another_data_order_is_refused(tmp_path, key, value):
    ckpt = tmp_path / "run.ckpt"
    fit(epochs=1, checkpoint=str(ckpt), max_steps=5)
    with pytest.raises(CheckpointError, match=f"written with {key} = .*this run has {value!r}"):
        fit(epochs=1, checkpoint=str(ckpt), resume=True, **{key: value})


def test_resume_with_another_max_chars_is_refused_only_when_the_text_read_changes(tmp_path, tiny_charlm):
    ckpt = tmp_path / "run.ckpt"
    size = len(open(tiny_charlm["text_file"]).read())  # the corpus is shorter than both limits below
    fit(**tiny_charlm, checkpoint=str(ckpt), max_steps=3, max_chars=size + 100)
    again, _ = fit(**tiny_charlm, checkpoint=str(ckpt), max_steps=4, max_chars=size + 1000, resume=True)
    assert again.step == 4
    with pytest.raises(CheckpointError, match="written on other training data"):
        fit(**tiny_charlm, checkpoint=str(ckpt), max_steps=5, max_chars=size - 100, resume=True)


@pytest.mark.parametrize("key,value,match", [
    ("lr", 0.01, "written with lr = 0.1, this run has 0.01.*init_from"),
    ("momentum", 0.5, "written with momentum = 0.9, this run has 0.5"),
    ("weight_decay", 0.5, "written with weight_decay = 0.0, this run has 0.5"),
    ("optimizer", "adam", "optimizer SGD, this run uses Adam"),
])
def test_resume_with_other_optimizer_settings_is_refused(tmp_path, key, value, match):
    # the checkpoint's optimizer state and schedule would overwrite them: the new value would be ignored
    ckpt = tmp_path / "run.ckpt"
    fit(epochs=1, checkpoint=str(ckpt), max_steps=5, lr=0.1)
    with pytest.raises(CheckpointError, match=match):
        fit(epochs=1, checkpoint=str(ckpt), resume=True, **{"lr": 0.1, key: value})


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_the_learning_rate_each_step_used(tmp_path):
    # cosine over 8 steps: step s (1-based) ran at lr/2 * (1 + cos(pi (s-1) / 8)), so the last one at > 0
    metrics = tmp_path / "m.jsonl"
    trainer, _ = fit(epochs=1, batch_size=200, lr=0.1, eval_every=1, metrics=str(metrics))
    records = _records(metrics)
    assert [r["step"] for r in records] == list(range(1, 9)) and trainer.steps_per_epoch == 8
    expected = [0.05 * (1 + np.cos(np.pi * s / 8)) for s in range(8)]
    np.testing.assert_allclose([r["lr"] for r in records], expected, rtol=1e-6)


@pytest.mark.parametrize("total", [3, 4, 5, 7, 8, 46, 100])
def test_the_step_schedule_has_three_stages(total):
    from distbp.train import build_optimizer, build_schedule

    config = make_config({"schedule": "step", "lr": 1.0})
    optimizer = build_optimizer(config, [nn.Parameter(np.zeros(2, np.float32))])
    schedule = build_schedule(config, optimizer, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    levels = sorted(set(lrs), reverse=True)
    np.testing.assert_allclose(levels, [1.0, 0.1, 0.01])
    counts = [lrs.count(level) for level in levels]
    assert lrs == sorted(lrs, reverse=True) and max(counts) - min(counts) <= 1, lrs


def test_a_run_killed_and_resumed_reports_the_training_loss_of_an_uninterrupted_one(tmp_path):
    # killed after the checkpoint of step 8: the evaluation interval 7-12 spans the kill, and the mean of
    # its training losses counts steps 7 and 8 too (they are in the checkpoint)
    ckpt, killed_at = tmp_path / "run.ckpt", tmp_path / "at8.ckpt"

    class CopyAtStep8(Trainer):
        def save(self):
            super().save()
            if self.step == 8:
                shutil.copy(ckpt, killed_at)

    common = dict(epochs=2, batch_size=128, eval_every=6, checkpoint_every=4, progress="none")
    CopyAtStep8(make_config({**common, "checkpoint": str(ckpt), "metrics": str(tmp_path / "whole.jsonl")})).fit()
    fit(**common, checkpoint=str(killed_at), resume=True, metrics=str(tmp_path / "part.jsonl"))
    whole = {r["step"]: r for r in _records(tmp_path / "whole.jsonl")}
    part = {r["step"]: r for r in _records(tmp_path / "part.jsonl")}
    assert min(part) == 12 and max(part) == max(whole)
    for step in part:
        assert part[step]["train_loss"] == pytest.approx(whole[step]["train_loss"], rel=1e-12), step
        assert part[step]["lr"] == whole[step]["lr"], step


@pytest.mark.parametrize("checkpoint_every", [15, 45])
def test_a_run_stopped_while_it_evaluates_an_epochs_end_writes_that_epochs_record_when_resumed(tmp_path,
                                                                                              checkpoint_every):
    # a checkpoint due at an epoch's last step (45 steps per epoch) is written after that epoch's record:
    # written before it, a stop during the evaluation left a checkpoint past an epoch never recorded
    class StoppedInFirstEvaluation(Trainer):
        def _log_eval(self, metrics, progress):
            if self.step == 45:
                raise KeyboardInterrupt  # SIGTERM
            return super()._log_eval(metrics, progress)

    common = dict(epochs=2, checkpoint_every=checkpoint_every, progress="none")
    fit(**common, metrics=str(tmp_path / "whole.jsonl"))
    part = dict(common, checkpoint=str(tmp_path / "run.ckpt"), metrics=str(tmp_path / "part.jsonl"))
    with pytest.raises(KeyboardInterrupt):
        StoppedInFirstEvaluation(make_config(part)).fit()
    fit(**part, resume=True)
    whole, resumed = _records(tmp_path / "whole.jsonl"), _records(tmp_path / "part.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [45, 90]
    for a, b in zip(resumed, whole):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)


@pytest.mark.parametrize("eval_every", [0, 10])
def test_a_run_started_again_after_its_end_adds_no_record(tmp_path, eval_every):
    # a requeued job runs the same command again: the checkpoint says the run ended and was reported
    options = dict(epochs=1, eval_every=eval_every, checkpoint=str(tmp_path / "run.ckpt"), resume=True,
                   metrics=str(tmp_path / "m.jsonl"))
    fit(**options)
    first = _records(tmp_path / "m.jsonl")
    fit(**options)
    assert _records(tmp_path / "m.jsonl") == first and first[-1]["step"] == 45


def test_after_a_stop_at_max_steps_the_next_record_averages_the_steps_since_the_last(tmp_path):
    options = dict(epochs=1, checkpoint=str(tmp_path / "run.ckpt"), metrics=str(tmp_path / "m.jsonl"))
    trainer, _ = fit(**options, max_steps=5)
    fit(**options, max_steps=10, resume=True)
    records = _records(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == [5, 10]
    whole = []
    uninterrupted = Trainer(make_config({"epochs": 1, "max_steps": 10, "progress": "none"}))
    uninterrupted._train_step = _recording(uninterrupted._train_step, whole)
    uninterrupted.fit()
    assert records[0]["train_loss"] == pytest.approx(np.mean(whole[:5]), rel=1e-12)
    assert records[1]["train_loss"] == pytest.approx(np.mean(whole[5:]), rel=1e-12)


def _recording(step, losses):
    def record(x, y):
        loss, resume_at = step(x, y)
        losses.append(loss)
        return loss, resume_at
    return record


def _other_text_with_as_many_characters(tiny_charlm, tmp_path):
    text = open(tiny_charlm["text_file"]).read()
    vocab = sorted(set(text))
    shifted = {c: chr(ord(c) + 0x100) for c in vocab}  # the same codes, other characters
    other = tmp_path / "other.txt"
    other.write_text("".join(shifted[c] for c in text))
    return str(other)


def test_a_charlm_run_is_not_resumed_or_started_from_weights_on_another_text(tmp_path, tiny_charlm):
    # the same number of characters: the shapes fit, but every code would mean another character
    ckpt = tmp_path / "lm.ckpt"
    fit(**tiny_charlm, checkpoint=str(ckpt), max_steps=3)
    other = _other_text_with_as_many_characters(tiny_charlm, tmp_path)
    with pytest.raises(CheckpointError, match="written on a text of .* characters.*use the same text file"):
        fit(**{**tiny_charlm, "text_file": other}, checkpoint=str(ckpt), resume=True)
    with pytest.raises(CheckpointError, match="written on a text of"):
        fit(**{**tiny_charlm, "text_file": other}, init_from=str(ckpt), max_steps=1)
    with pytest.raises(CheckpointError, match="checkpoint of model 'charlm', not 'mlp'"):
        fit(epochs=1, init_from=str(ckpt), max_steps=1)
    with pytest.raises(CheckpointError, match="checkpoint of model 'charlm', not 'mlp'"):
        fit(epochs=1, checkpoint=str(ckpt), resume=True)  # named before the optimizers (Adam, SGD) differ
    # a setting that changes a shape is named, not the shape
    with pytest.raises(CheckpointError, match="written with block_size = 16, this run has 8"):
        fit(**{**tiny_charlm, "block_size": 8}, checkpoint=str(ckpt), resume=True)


def test_a_charlm_checkpoint_is_not_resumed_or_started_from_with_other_heads(tmp_path, tiny_charlm):
    # n_heads shapes no parameter: the same weights split into other heads are another model
    ckpt = tmp_path / "lm.ckpt"
    fit(**tiny_charlm, max_steps=3, checkpoint=str(ckpt))
    with pytest.raises(CheckpointError, match="written with n_heads = 2, this run has 1"):
        fit(**{**tiny_charlm, "n_heads": 1}, max_steps=5, checkpoint=str(ckpt), resume=True)
    with pytest.raises(CheckpointError, match="written with n_heads = 2, this run has 4"):
        fit(**{**tiny_charlm, "n_heads": 4}, max_steps=5, init_from=str(ckpt))
    trainer, _ = fit(**{**tiny_charlm, "dropout": 0.0}, max_steps=5, checkpoint=str(ckpt), resume=True)
    assert trainer.step == 5  # dropout may change


def test_text_evaluation_samples_windows_spread_over_the_whole_test_split(tiny_charlm):
    from distbp.data import CharDataset

    trainer = Trainer(make_config({**tiny_charlm, "progress": "none"}))
    seen = []

    class Recording(CharDataset):
        def __getitem__(self, indices):
            seen.extend(np.asarray(indices).tolist())
            return super().__getitem__(indices)

    trainer.split.test.__class__ = Recording
    trainer.EVAL_TEXT_WINDOWS = 5
    trainer.evaluate()
    windows = len(trainer.split.test)
    assert windows > 5 and seen == [0, (windows - 1) // 4, (windows - 1) // 2, 3 * (windows - 1) // 4, windows - 1]


def test_the_sample_shows_the_prompt_it_was_given(tiny_charlm, tmp_path):
    # "def " is not in this text: the sample starts from the text's first character, and says so
    other = _other_text_with_as_many_characters(tiny_charlm, tmp_path)
    trainer, summary = fit(**{**tiny_charlm, "text_file": other, "sample_length": 5}, max_steps=2)
    vocab = trainer.split.meta["vocab"]
    assert "d" not in vocab and summary["sample"][0] == vocab[0] and len(summary["sample"]) == 6


def test_the_last_record_of_a_run_evaluated_every_k_steps_names_its_last_epoch(tmp_path):
    metrics = tmp_path / "m.jsonl"
    trainer, _ = fit(epochs=2, eval_every=20, metrics=str(metrics))  # 90 steps: the last record comes after the loop
    records = _records(metrics)
    assert records[-1]["step"] == 2 * trainer.steps_per_epoch and records[-1]["epoch"] == 2
    assert [r["epoch"] for r in records] == [1, 1, 2, 2, 2]


@pytest.mark.parametrize("key", ["checkpoint", "metrics", "trace"])
def test_an_output_path_that_cannot_be_written_is_refused_before_training(tmp_path, key):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=f"'{key}' is .* but .*afile is not a directory"):
        fit(epochs=1, **{key: str(tmp_path / "afile" / "out")})
    with pytest.raises(ConfigError, match="is a directory"):
        fit(epochs=1, **{key: str(tmp_path)})


def test_a_new_run_can_start_from_a_checkpoints_weights(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first, _ = fit(epochs=1, checkpoint=str(ckpt), optimizer="adam", lr=1e-3, seed=3)
    # other settings: batch size, optimizer, seed and schedule need not match, only the model
    settings = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "momentum": 0.0, "max_steps": 1, "progress": "none"}
    warm = Trainer(make_config({**settings, "init_from": str(ckpt)}))
    warm.fit()
    cold = Trainer(make_config(settings))
    cold.fit()
    assert warm.step == 1 and not any(warm.optimizer.state.values())  # SGD without momentum: no state
    # one small step away from the checkpoint's weights, where a fresh initialisation is far from them
    for name, value in _params(first.model).items():
        assert np.abs(_params(warm.model)[name] - value).max() < 0.01, name
    assert all(np.abs(_params(cold.model)[n] - v).max() > 0.1 for n, v in _params(first.model).items())
    with pytest.raises(CheckpointError, match="different model"):
        fit(epochs=1, hidden=[16], init_from=str(ckpt))


def test_checkpoint_holds_weights_optimizer_and_position(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    trainer, _ = fit(epochs=1, checkpoint=str(ckpt), optimizer="adam", lr=1e-3)
    arrays, meta = load_safetensors(ckpt)
    assert any(k.startswith("model/") for k in arrays) and any(k.startswith("optim/") for k in arrays)
    fresh = Trainer(make_config({"epochs": 1, "optimizer": "adam", "lr": 1e-3, "progress": "none"}))
    state = load_checkpoint(ckpt, fresh.model, fresh.optimizer)
    assert state["step"] == trainer.step and state["epoch"] == 1
    for name, value in _params(trainer.model).items():
        np.testing.assert_array_equal(_params(fresh.model)[name], value)


def test_metrics_are_json_lines(tmp_path):
    import json

    path = tmp_path / "m.jsonl"
    fit(epochs=2, metrics=str(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all({"step", "train_loss", "test_loss", "test_accuracy", "lr"} <= set(r) for r in records)
    assert records[1]["train_loss"] < records[0]["train_loss"]


def test_plain_progress_lines_when_not_a_terminal(capsys):
    import io

    out = io.StringIO()
    Trainer(make_config({"epochs": 1, "progress": "auto", "log_every": 10}), stream=out).fit()
    text = out.getvalue()
    assert "\r" not in text
    assert "step 10/" in text and "samples/s" in text and "ETA" in text
    assert "test accuracy" in text


def test_the_rate_counts_only_the_samples_of_timed_steps(monkeypatch):
    from distbp.train import progress as progress_module

    now = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    progress = progress_module.Progress(4, "plain", every=1, stream=out)
    progress.update(1, 0, 1.0, 64)  # the clock starts here: no rate yet
    now[0] += 0.5
    progress.update(2, 0, 1.0, 64)
    now[0] += 0.5
    progress.update(3, 0, 1.0, 32)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("- samples/s ETA --:--"), lines
    assert "128 samples/s ETA 00:01" in lines[1], lines  # 64 in 0.5 s; 2 steps left at 0.5 s each
    assert "96 samples/s ETA 00:00" in lines[2], lines  # (64 + 32) in 1 s


# --- a step the servers refused (a parameter-server worker that rejoined them) -----------------------


class _RefusedOnce(LocalStep):
    """A one-process step whose apply number `at` is refused, naming the step to go on from (as PSStep
    does after rejoining its servers)."""

    def __init__(self, at, go_to):
        self.at, self.go_to, self.calls = at, go_to, 0

    def apply(self, model, optimizer):
        self.calls += 1
        if self.calls == self.at:
            return self.go_to
        return super().apply(model, optimizer)


@pytest.mark.parametrize("at, go_to, calls, records, saves", [
    (4, 3, 19, [(6, 1), (12, 2), (18, 3)], [(6, 1, 0), (12, 2, 0), (18, 3, 0)]),  # the step taken again
    # ahead into the next epoch: the epoch left ends where this worker left it, with its record and save
    (4, 6, 16, [(3, 1), (12, 2), (18, 3)], [(6, 1, 0), (12, 2, 0), (18, 3, 0)]),
    # behind (a server restored from an older checkpoint): those steps again, and their records
    (7, 3, 22, [(6, 1), (6, 1), (12, 2), (18, 3)], [(6, 1, 0), (6, 1, 0), (12, 2, 0), (18, 3, 0)]),
    # past the end of the run (at most the end is taken): nothing left, the summary evaluates
    (13, 25, 13, [(6, 1), (12, 2)], [(6, 1, 0), (12, 2, 0), (18, 3, 0)]),
])
def test_a_refused_step_goes_on_where_the_strategy_says(tmp_path, at, go_to, calls, records, saves):
    config = make_config({"epochs": 3, "batch_size": 256, "progress": "plain", "log_every": 1000,
                          "metrics": str(tmp_path / "m.jsonl"), "checkpoint": str(tmp_path / "c.ckpt")})
    stream = io.StringIO()
    trainer = Trainer(config, _RefusedOnce(at, go_to), stream=stream)
    assert trainer.steps_per_epoch == 6
    saved, save = [], trainer.save
    trainer.save = lambda: (saved.append((trainer.step, trainer.epoch, trainer.batch)), save())
    summary = trainer.fit()
    assert summary["steps"] == 18 and trainer.strategy.calls == calls
    assert 0.5 < summary["test_accuracy"] <= 1.0
    written = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in written] == records
    assert saved == saves
    said = [line for line in stream.getvalue().splitlines() if "rejoined" in line]
    assert said == ([f"rejoined the servers at step {go_to}: continuing from epoch {go_to // 6 + 1}, batch {go_to % 6}"]
                    if go_to < 18 else ["rejoined the servers, which had taken this worker's run to its end (step 18)"])


def test_records_of_steps_taken_again_replace_the_earlier_ones(tmp_path):
    from distbp.train.progress import read_metrics

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": n, "train_loss": 1.0 / n}) + "\n" for n in (6, 12, 18, 12, 18, 24)))
    assert [r["step"] for r in read_metrics(path)] == [6, 12, 18, 24]
    assert read_metrics(path)[1]["train_loss"] == 1.0 / 12


def test_a_record_still_being_written_is_left_out_and_a_broken_one_named(tmp_path):
    # `distbp plot` while a run writes its metrics: the last line may be half there
    from distbp.train.progress import read_metrics

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 6, "train_loss": 1.0}\n{"step": 12, "train_lo')
    assert [r["step"] for r in read_metrics(path)] == [6]
    path.write_text('{"step": 6, "train_loss": 1.0}\n{"step": 12, "train_lo\n')  # ended: broken, not unfinished
    with pytest.raises(ValueError, match="m.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_records_appended_after_an_unfinished_one_start_on_a_line_of_their_own(tmp_path):
    # a run killed while writing a record, then resumed: the torn record goes, the file stays readable
    from distbp.train.progress import MetricsLog, read_metrics

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 6, "train_loss": 1.0}\n{"step": 12, "train_lo')
    MetricsLog(path, append=True).write(step=12, train_loss=0.5)
    assert read_metrics(path) == [{"step": 6, "train_loss": 1.0}, {"step": 12, "train_loss": 0.5}]


def test_a_move_back_does_not_count_the_losses_of_the_steps_taken_again(tmp_path):
    # refused at step 8, the servers at 3: the record at step 6 is the mean of steps 3-5, not also of the
    # abandoned 6-7
    config = make_config({"epochs": 1, "batch_size": 64, "progress": "none", "eval_every": 6,
                          "metrics": str(tmp_path / "m.jsonl")})
    trainer = Trainer(config, _RefusedOnce(9, 3))
    counted = []
    log_eval = trainer._log_eval
    trainer._log_eval = lambda metrics, progress: (counted.append((trainer.step, trainer.loss_count)),
                                                   log_eval(metrics, progress))[1]
    trainer.fit()
    assert counted[:2] == [(6, 6), (6, 3)]
