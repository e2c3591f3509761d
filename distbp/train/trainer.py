"""The training loop, written once. What turns local gradients into an update is a pluggable step:
`LocalStep` here; the MPI all-reduce and the parameter server plug in the same way.
"""

import json
import math
import socket
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .. import models, nn, optim
from ..autograd import Tensor, check_rng_state, get_rng_state, manual_seed, no_grad, set_rng_state
from ..autograd.random import DROPOUT_STREAM
from ..autograd.ops import cross_entropy
from ..data import BatchLoader, CharDataset, ShardSampler, load_digits, load_idx_dir, load_synthetic, load_text
from ..data.datasets import DataError, fingerprint
from ..optim.optimizer import is_finite_real
from ..serialization import brief_repr
from .checkpoint import CheckpointError, is_count, load_checkpoint, load_weights, save_checkpoint
from .config import RESUME_KEYS, ConfigError, check_outputs, default_dataset, effective_settings, to_dict
from .progress import MetricsLog, Progress
from .steps import LocalStep
from .trace import Tracer, write_trace


# --- building a run from its configuration --------------------------------------------------------------


def build_data(config):
    dataset = config.dataset or default_dataset(config.model)
    images = config.model == "cnn"
    if config.model == "charlm" and dataset != "text":
        raise ConfigError(f"config: model 'charlm' trains on dataset 'text', not {dataset!r}")
    if config.model != "charlm" and dataset == "text":
        raise ConfigError(f"config: dataset 'text' is for model 'charlm', not {config.model!r}")
    if dataset == "digits":
        return load_digits(images=images)
    if dataset == "idx":
        if not config.data_dir:
            raise ConfigError("config: dataset 'idx' needs 'data_dir' (a directory of MNIST-format IDX files)")
        return load_idx_dir(config.data_dir, images=images)
    if dataset == "synthetic":
        return load_synthetic(n=config.synthetic_size, features=784 if images else 64, images=images)
    return load_text(config.text_file, block_size=config.block_size, max_chars=config.max_chars)


def build_model(config, split):
    if config.model == "mlp":
        return models.mlp(split.input_shape, split.num_classes, config.hidden)
    if config.model == "cnn":
        return models.cnn(split.input_shape, split.num_classes)
    if config.d_model % config.n_heads:
        raise ConfigError(f"config: d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
    return models.charlm(split.num_classes, config.block_size, config.d_model, config.n_layers,
                         config.n_heads, config.dropout)


def build_optimizer(config, model_or_params):
    params = list(model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params)
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = optim.Adam if config.optimizer == "adam" else optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_schedule(config, optimizer, total_steps):
    decay_steps = max(total_steps - config.warmup_steps, 1)
    after = None
    if config.schedule == "cosine":
        after = optim.CosineAnnealingLR(optimizer, decay_steps).lr_at
    elif config.schedule == "step":
        def after(base_lr, t):  # 10x lower after each third of the decay steps (three stages from 3 steps on)
            return base_lr * 0.1 ** min(2, 3 * t // decay_steps)
    if config.warmup_steps:
        return optim.LinearWarmupLR(optimizer, config.warmup_steps, after=after)
    return optim.LambdaLR(optimizer, lambda t: 1.0) if after is None else _Closed(optimizer, after)


class _Closed(optim.LRScheduler):
    def __init__(self, optimizer, lr_at):
        self._lr_at = lr_at
        super().__init__(optimizer)

    def lr_at(self, base_lr, t):
        return self._lr_at(base_lr, t)


# --- the loop ------------------------------------------------------------------------------------------


class Trainer:
    """Trains config.model on config.dataset; `fit()` returns a summary dict."""

    EVAL_BATCH = 512
    EVAL_TEXT_WINDOWS = 512

    def __init__(self, config, step=None, stream=None, split=None):
        """split: the data, when already loaded (build_data(config)); thread ranks share one, read-only."""
        self.config = config
        self.strategy = step or LocalStep()
        self.stream = stream or sys.stdout
        self.is_main = self.strategy.rank == 0
        manual_seed(config.seed)  # the same initialisation on every rank
        self.split = split if split is not None else build_data(config)
        self.model = build_model(config, self.split)
        if hasattr(self.strategy, "bind"):  # a parameter-server worker learns its rank by registering
            self.strategy.bind(self.model)
            self.is_main = self.strategy.rank == 0
            outputs = [f"--{k}" for k in ("metrics", "trace") if getattr(config, k)]
            if not self.is_main and outputs:  # (an MPI rank's are rank 0's too, but all ranks share one command)
                self.stream.write(f"worker {self.strategy.rank}: {' and '.join(outputs)} {'is' if len(outputs) == 1 else 'are'} written by worker 0 "
                                  "alone, as its progress is shown; this worker writes none\n")
                self.stream.flush()
        self.optimizer = build_optimizer(config, self.model)
        sampler = ShardSampler(len(self.split.train), self.strategy.rank, self.strategy.world_size,
                               shuffle=True, seed=config.seed)
        self.loader = BatchLoader(self.split.train, config.batch_size, sampler)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.schedule = build_schedule(config, self.optimizer, self.total_steps)
        self.step = self.epoch = self.batch = 0
        # the mean training loss reported at the next evaluation: this rank's sum of losses and their number
        self.loss_sum, self.loss_count = 0.0, 0
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # the learning rate of the last step taken
        self.resumed_contents = None  # set by resume() (see _contents_checksum)
        # dropout draws from the thread's generator; each rank its own stream
        manual_seed([config.seed, DROPOUT_STREAM, self.strategy.rank])

    # --- checkpoints ---

    def _state(self, rngs, loss_sum):
        return {
            "step": self.step, "epoch": self.epoch, "batch": self.batch, "model": self.config.model,
            "rng": rngs, "schedule": self.schedule.state_dict(), "lr_used": self.lr_used,
            "vocab": self.split.meta.get("vocab"),  # a text model's codes mean these characters
            "data": self._data_fingerprint(),  # what it was trained on: a resume must go on with the same
            "running_loss": {"sum": loss_sum, "count": self.loss_count},
            "world_size": self.strategy.world_size, "config": to_dict(self.config),
        }

    def save(self):
        """Every rank calls this at the same points: each rank's dropout generator goes into the file."""
        if self.config.checkpoint:
            rngs = self.strategy.gather(_jsonable(get_rng_state()))
            # every rank has taken the same number of steps: the ranks' sum, spread evenly again at resume,
            # gives the same mean
            loss_sum, = self.strategy.all_sum([self.loss_sum])
            if self.is_main:
                save_checkpoint(self.config.checkpoint, self.model, self.optimizer, self._state(rngs, loss_sum))

    def _check_settings(self, path, state):
        """Refuse a checkpoint of another run: model, settings, text (before its shapes are compared, which
        would name a shape where these name the setting)."""
        self._check_model_name(path, state.get("model"))
        differing = self._setting_differing(path, state, RESUME_KEYS)
        if differing:
            key, value, mine = differing
            raise CheckpointError(
                f"{path}: written with {key} = {value!r}, this run has {mine!r}; resume with the same "
                "value (the data order, the schedule and the optimizer's state depend on it), or start a "
                "new run from the checkpoint's weights with init_from"
            )
        self._check_vocab(path, state)
        saved_data = state.get("data")
        if saved_data is not None and (not isinstance(saved_data, str) or saved_data.count(":") != 1):
            raise CheckpointError(f"{path}: damaged checkpoint state: data is {saved_data!r}, not COUNT:FINGERPRINT")
        if saved_data is not None and saved_data != self._data_fingerprint():
            raise CheckpointError(
                f"{path}: written on other training data ({saved_data.split(':')[0]} examples, fingerprint "
                f"{saved_data.split(':')[-1]}) than this run's ({len(self.split.train)} examples, fingerprint "
                f"{self._data_fingerprint().split(':')[-1]}): resume on the same data, or start a new run from the "
                "checkpoint's weights with init_from")

    def _data_fingerprint(self):
        return fingerprint(self.split)

    def _check_state(self, path, state):
        """Refuse a checkpoint's saved state that resume() could not restore whole (before anything changes)."""
        written_by = state.get("world_size", 1)  # (checkpoints of one rank may not say)
        if written_by != self.strategy.world_size:
            raise CheckpointError(
                f"{path}: written by {written_by} rank{'' if written_by == 1 else 's'}; "
                f"resume with the same world size "
                f"(now {self.strategy.world_size}): the data order depends on it"
            )
        for key in ("step", "epoch", "batch"):
            value = state.get(key)
            if not is_count(value):
                raise CheckpointError(f"{path}: damaged checkpoint state: {key} is {value!r}, not an integer >= 0")
        step, epoch, batch = state["step"], state["epoch"], state["batch"]
        if batch > self.steps_per_epoch or step != epoch * self.steps_per_epoch + batch:
            raise CheckpointError(f"{path}: its position (step {step}, epoch {epoch + 1}, batch {batch}) does not fit "
                                  f"this run's {self.steps_per_epoch} steps per epoch: a damaged file, or another data set")
        running = state.get("running_loss", _NO_RUNNING_LOSS)
        if (not isinstance(running, dict) or not is_count(running.get("count"))
                or not is_finite_real(running.get("sum")) or not is_finite_real(state.get("lr_used", 0.0))):
            raise CheckpointError(f"{path}: damaged checkpoint state: running_loss {running!r} or lr_used "
                                  f"{state.get('lr_used')!r}")
        if running["count"] > step:  # losses of steps the run has not taken
            raise CheckpointError(f"{path}: damaged checkpoint state: a running loss over {running['count']} steps "
                                  f"at step {step}")
        try:
            last_step, base_lrs = self.schedule.check_state_dict(state.get("schedule"))
            if last_step != step:  # the learning rate would follow the schedule from elsewhere
                raise ValueError(f"the schedule is at step {last_step}, the run at step {step}")
            if base_lrs != self.schedule.base_lrs:  # the configured rate, compared as a setting already
                raise ValueError(f"the schedule's base rates are {base_lrs}, this run's {self.schedule.base_lrs}")
            for rng in self._rank_rngs(state):
                check_rng_state(rng)
        except ValueError as e:
            raise CheckpointError(f"{path}: damaged checkpoint state: {e}") from None

    def _check_weights_of(self, path, state):
        if state.get("model") is not None:  # (a checkpoint of the API's save_checkpoint may not say)
            self._check_model_name(path, state["model"])
        differing = self._setting_differing(path, state, ("n_heads",))  # every shape agrees, not the meaning
        if differing:
            key, value, mine = differing
            raise CheckpointError(f"{path}: written with {key} = {value!r}, this run has {mine!r}: its attention "
                                  "weights are split into heads that way")
        self._check_vocab(path, state)

    def _setting_differing(self, path, state, keys):
        """(key, saved value, this run's) of the first of `keys` that the checkpoint's config sets, as it takes
        effect, to another value than this run's; None when all agree (or the checkpoint has no config)."""
        saved = state.get("config")
        if not isinstance(saved, dict):
            return None
        if not isinstance(saved.get("model", ""), (str, type(None))):
            raise CheckpointError(f"{path}: damaged checkpoint state: its config's model is "
                                  f"{brief_repr(saved['model'])}")
        theirs = effective_settings(saved, [k for k in keys if k in saved])
        mine = effective_settings(to_dict(self.config), keys)
        return next(((k, v, mine[k]) for k, v in theirs.items() if k in mine and v != mine[k]), None)

    def _check_model_name(self, path, saved):
        if saved != self.config.model:
            raise CheckpointError(f"{path}: checkpoint of model {saved!r}, not {self.config.model!r}")

    def _check_vocab(self, path, state):
        """A text model's codes stand for its text's characters: another text's would be a silent remap."""
        saved, mine = state.get("vocab"), self.split.meta.get("vocab")
        if saved is not None and not isinstance(saved, str):
            raise CheckpointError(f"{path}: damaged checkpoint state: vocab is {saved!r}, not a string")
        if saved is not None and mine is not None and saved != mine:
            raise CheckpointError(f"{path}: written on a text of {len(saved)} characters {saved[:20]!r}..., this "
                                  f"run's has {len(mine)} {mine[:20]!r}...: its codes would mean other characters; "
                                  "use the same text file (and max_chars)")

    def _rank_rngs(self, state):
        """Each rank's saved generator state (a checkpoint of one rank may hold the state alone)."""
        rngs = state.get("rng")
        if isinstance(rngs, dict):  # one rank's state: a checkpoint of one rank, or of distbp before 2026-11-29
            if self.strategy.world_size > 1 and self.is_main and not getattr(self, "_warned_rng", False):
                self._warned_rng = True
                self._say("note: the checkpoint holds rank 0's dropout generator only (an older format): every "
                          "rank continues from it, so dropout masks differ from an uninterrupted run's")
            rngs = [rngs] * self.strategy.world_size
        if not isinstance(rngs, list) or len(rngs) != self.strategy.world_size:
            raise ValueError(f"rng holds no generator state for each of the {self.strategy.world_size} ranks")
        return rngs

    def resume(self):
        path = self.config.checkpoint
        if not path:
            raise ConfigError("config: 'resume' needs 'checkpoint' (the file to resume from)")
        if not Path(path).exists():
            self._say(f"no checkpoint at {path} yet: starting from the beginning")
            return False
        state = load_checkpoint(path, self.model, self.optimizer, check_state=lambda s: self._check_state(path, s),
                                check_first=lambda s: self._check_settings(path, s))
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.schedule.load_state_dict(state["schedule"])
        running = state.get("running_loss", _NO_RUNNING_LOSS)
        self.loss_sum, self.loss_count = running["sum"] / self.strategy.world_size, running["count"]
        self.lr_used = state.get("lr_used", self.optimizer.param_groups[0]["lr"])
        set_rng_state(self._rank_rngs(state)[self.strategy.rank])
        self.resumed_contents = self._contents_checksum(state)
        where = (f"the end of epoch {self.epoch}" if self.batch == 0 and self.epoch > 0 else
                 f"epoch {self.epoch + 1}, batch {self.batch}")
        self._say(f"resumed from {path} at step {self.step} ({where})")
        return True

    def _contents_checksum(self, state):
        """A checksum of all a resumed run took from its checkpoint. Ranks that read different files (node-local
        copies of two runs) at the same step would train on together: DataParallel gives every rank rank 0's
        parameters, but each would keep its own optimizer state and schedule."""
        crc = zlib.crc32(json.dumps(state, sort_keys=True, default=repr).encode())
        for p in self.model.parameters():
            crc = zlib.crc32(np.ascontiguousarray(p.data), crc)
        for entries in self.optimizer.state.values():
            for value in entries.values():
                crc = zlib.crc32(np.ascontiguousarray(value) if isinstance(value, np.ndarray) else repr(value).encode(),
                                 crc)
        return crc

    def _move_to(self, step):
        """Take up the run at `step`: its place in the data and in the schedule."""
        self.step, self.epoch, self.batch = step, step // self.steps_per_epoch, step % self.steps_per_epoch
        self.schedule.load_state_dict({**self.schedule.state_dict(), "last_step": step})

    # --- evaluation ---

    def evaluate(self):
        """(mean loss, accuracy) on the held-out split, sharded over ranks and combined."""
        data = self.split.test
        order = np.arange(len(data))
        if isinstance(data, CharDataset) and len(order) > self.EVAL_TEXT_WINDOWS:
            # a fixed sample spread evenly over the whole test text (its start alone may be unlike the rest)
            order = np.unique(np.linspace(0, len(order) - 1, self.EVAL_TEXT_WINDOWS).astype(np.int64))
        if getattr(self.strategy, "shards_evaluation", True):
            order = order[self.strategy.rank::self.strategy.world_size]
        loss_sum = correct = count = 0.0
        self.model.eval()
        with no_grad():
            for start in range(0, len(order), self.EVAL_BATCH):
                x, y = data[order[start:start + self.EVAL_BATCH]]
                logits = self.model(x if isinstance(data, CharDataset) else Tensor(x))
                loss_sum += float(cross_entropy(logits, y, reduction="sum").data)
                correct += float((logits.data.argmax(-1) == y).sum())
                count += y.size
        self.model.train()
        loss_sum, correct, count = self.strategy.all_sum([loss_sum, correct, count])
        return loss_sum / max(count, 1), correct / max(count, 1)

    # --- training ---

    def _say(self, text):
        if self.is_main and self.config.progress != "none":
            self.stream.write(text + "\n")
            self.stream.flush()

    def fit(self):
        try:
            if not self.config.threads:
                return self._fit()
            with threadpool_limits(self.config.threads):
                return self._fit()
        except Exception:
            # a run that failed gives back what its step holds (DataParallel's shared buckets and copy of the
            # communicator, a worker's channels), so a program that goes on can train again; not on a
            # stop signal, after which the process ends
            try:
                self.strategy.close()
            except Exception:  # noqa: BLE001 -- the run's own error is the one to report
                pass
            raise

    def _fit(self):
        cfg = self.config
        resumed = self.resume() if cfg.resume else False
        # a parameter-server worker goes on where its servers have its run, which hold the parameters: with
        # --resume too, whose checkpoint may be older or newer than what the servers kept
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        start = getattr(self.strategy, "start_step", None)
        if start is not None and min(start, stop_at) != self.step:
            checkpoint_step = self.step
            self._move_to(min(start, stop_at))
            self.loss_sum, self.loss_count = 0.0, 0  # losses of another position (a checkpoint's)
            if self.step < stop_at:
                self._say(f"the servers have this worker's run at step {start}"
                          f"{f' (its checkpoint is at step {checkpoint_step})' if resumed else ''}: "
                          f"continuing from epoch {self.epoch + 1}, batch {self.batch}")
        if cfg.init_from and not resumed:
            load_weights(cfg.init_from, self.model, check_state=lambda s: self._check_weights_of(cfg.init_from, s))
            self._say(f"starting from the weights of {cfg.init_from}")
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self._check_same_run()
        if self.is_main:
            check_outputs(cfg, ("checkpoint", "metrics", "trace"))
        self.tracer = None
        if cfg.trace:
            self.tracer = Tracer(self.strategy.rank, origin=self._trace_origin())
        self.strategy.prepare(self.model, self.optimizer, self.tracer)
        # appended to when the run goes on: resumed, or a parameter-server worker the servers had at a step
        metrics = MetricsLog(cfg.metrics if self.is_main else None, append=cfg.resume or self.step > 0,
                             after_step=self.step)
        progress = Progress(stop_at, cfg.progress if self.is_main else "none", cfg.log_every, self.stream)
        self._say(f"training {cfg.model} ({_count(self.model.num_parameters(), 'parameter')}) on "
                  f"{self.split.train.name}: {_count(len(self.split.train), 'example')}, "
                  f"{_count(self.steps_per_epoch, 'step')} per epoch, {_count(cfg.epochs, 'epoch')}")
        started = time.perf_counter()
        test_loss = accuracy = float("nan")
        finished = self.step >= stop_at or self.epoch >= cfg.epochs  # resumed from the run's last checkpoint
        if finished:
            self._say(f"the run already ended at step {self.step}: nothing to train")
            test_loss, accuracy = self.evaluate()
        stopped = finished
        while self.epoch < cfg.epochs and not stopped:
            resume_at = None
            for x, y in self.loader.batches(self.epoch, self.batch):
                loss, resume_at = self._train_step(x, y)
                if resume_at is not None:  # the step was not applied
                    break
                self.loss_sum += loss
                self.loss_count += 1
                self.step += 1
                if self.tracer is not None and not self.tracer.active:
                    self._write_trace()  # all traced: written now, so a run stopped later still has it
                self.batch += 1
                progress.update(self.step, self.epoch, loss, len(y) * self.strategy.world_size)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss} at step {self.step}; "
                                             "lower the learning rate or set grad_clip")
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    test_loss, accuracy = self._log_eval(metrics, progress)
                # one due at the epoch's last step is written after the epoch's record (below): before it, a
                # stop while evaluating would leave a checkpoint past an epoch that was never recorded
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                        and self.batch < self.steps_per_epoch):
                    self.save()
                if self.step >= stop_at:
                    stopped = True
                    break
            if resume_at is not None:
                stopped, report = self._rejoin_at(resume_at, stop_at, metrics, progress)
                if report is not None:
                    test_loss, accuracy = report
                continue
            if not stopped or self.batch >= self.steps_per_epoch:
                if not cfg.eval_every and self.loss_count:
                    test_loss, accuracy = self._log_eval(metrics, progress)
                self.epoch, self.batch = self.epoch + 1, 0
                due = self.step % cfg.checkpoint_every == 0 if cfg.checkpoint_every else True
                if due and not stopped and self.epoch < cfg.epochs:
                    self.save()  # (the run's end is saved below)
        if not finished:
            # the last record, then the last checkpoint: a run started again finds it ended and reported
            if self.loss_count:
                test_loss, accuracy = self._log_eval(metrics, progress)
            self.save()
        elapsed = time.perf_counter() - started
        summary = {"steps": self.step, "epochs": self.epoch, "test_loss": test_loss,
                   "test_accuracy": accuracy, "seconds": elapsed}
        progress.line(f"done: {self.step} steps in {elapsed:.1f} s; test loss {test_loss:.4f}, "
                      f"test accuracy {accuracy:.2%}")
        if cfg.model == "charlm" and cfg.sample_length and self.is_main:
            summary["sample"] = self.sample(cfg.sample_length)
            self._say("sample:\n" + summary["sample"])
        if self.tracer is not None:
            self._write_trace()  # (a run of fewer steps than are traced)
        self.strategy.close()
        return summary

    def _write_trace(self):
        """Gather every rank's spans and write the trace, once (every rank calls this at the same step)."""
        if self.tracer.written or not self.tracer.step:  # (a run with no step to trace keeps an earlier trace)
            return
        self.tracer.written = True
        events = self.strategy.gather(self.tracer.events)
        if self.is_main:
            write_trace(self.config.trace, events)

    def _train_step(self, x, y):
        tracer = self.tracer
        if tracer is not None:
            tracer.run_step = self.step + 1  # (all-reduce spans are recorded during the step)
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        inputs = x if isinstance(self.split.train, CharDataset) else Tensor(x)
        loss = cross_entropy(self.model(inputs), y)
        t1 = time.perf_counter()
        scale = self.strategy.loss_scale
        (loss * scale if scale != 1.0 else loss).backward()
        t2 = time.perf_counter()
        self.strategy.reduce_gradients(self.model)
        t3 = time.perf_counter()
        if self.config.grad_clip:
            nn.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        resume_at = self.strategy.apply(self.model, self.optimizer)
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        if tracer is not None and tracer.active:
            t4 = time.perf_counter()
            backend = self.strategy.backend
            spans = [("forward", t0, t1), ("backward", t1, t2)]
            if backend in ("threads", "mpi"):
                spans.append(("wait for all-reduce", t2, t3))
            spans.append(("push + pull" if backend == "ps" else "optimizer step", t3, t4))
            for name, start, end in spans:
                tracer.span(name, start, end)
            tracer.step += 1
        return float(loss.data), resume_at

    def _trace_origin(self):
        """Time 0 of the trace on this rank's clock: the moment the ranks leave one exchange, as the first rank
        of this machine read it. Ranks of one machine share a clock, so theirs line up exactly; another
        machine's perf_counter counts from its own boot, so its ranks take their own reading of that moment."""
        self.strategy.gather(None)  # every rank leaves this at about the same moment
        readings = self.strategy.gather((socket.gethostname(), time.perf_counter()))
        host = readings[self.strategy.rank][0]
        return next(t for h, t in readings if h == host)

    def _check_same_run(self):
        """Every rank must train the same model on the same data with the same settings."""
        if self.strategy.world_size == 1:
            return
        mine = {**to_dict(self.config), "train examples": len(self.split.train),
                "parameters": self.model.num_parameters(), "tracing": bool(self.config.trace),
                "position": (self.step, self.epoch, self.batch)}
        mine["checkpoint contents"] = self.resumed_contents
        mine["data"] = self._data_fingerprint()  # the same path may hold other data on another machine
        everyone = self.strategy.gather(mine)
        # each with its own message, below; the last two follow from the data (and a text's characters)
        named_apart = ("data", "position", "checkpoint contents", "train examples", "parameters")
        for rank, theirs in enumerate(everyone):
            # the settings first: another model, data set or size also gives other data and positions
            for key in mine:
                if key not in named_apart and key not in _PER_RANK_KEYS and theirs.get(key) != everyone[0].get(key):
                    raise ConfigError(
                        f"rank {rank} was started with {key} = {theirs.get(key)!r} but rank 0 with "
                        f"{everyone[0].get(key)!r}: every rank must run the same configuration"
                    )
            if theirs["position"] != everyone[0]["position"]:
                raise ConfigError(
                    f"rank {rank} starts at step {theirs['position'][0]} but rank 0 at step "
                    f"{everyone[0]['position'][0]}: resuming ranks must all read the same checkpoint"
                )
            if theirs["checkpoint contents"] != everyone[0]["checkpoint contents"]:
                raise ConfigError(
                    f"rank {rank} resumed from a checkpoint whose contents differ from rank 0's (both at step "
                    f"{theirs['position'][0]}): resuming ranks must all read the same checkpoint (a file on a "
                    "shared file system, or the same copy on every machine)"
                )
            if theirs["data"] != everyone[0]["data"]:
                raise ConfigError(
                    f"rank {rank} trains on other data than rank 0 (fingerprints {theirs['data']} and "
                    f"{everyone[0]['data']}): every machine's copy of the data set must be the same"
                )
            for key in ("train examples", "parameters"):
                if theirs[key] != everyone[0][key]:
                    raise ConfigError(f"rank {rank} has {key} = {theirs[key]!r} but rank 0 {everyone[0][key]!r}: "
                                      "every rank must build the same model from the same data")

    def _rejoin_at(self, step, stop_at, metrics, progress):
        """Go on at `step`, where the servers have this worker's run, after they refused its last step (a
        parameter-server worker that had to rejoin them). Returns (stopped, (test loss, accuracy) of a
        record written, or None).

        Ahead into a later epoch (the others went on without it): the epoch it leaves ends here, with its
        record and checkpoint. Behind (a server restored from an older checkpoint): the steps are taken
        again, and their records written again. Past the run's end: at its end."""
        step = min(step, stop_at)
        report = None
        leaving = step // self.steps_per_epoch > self.epoch
        if leaving and not self.config.eval_every and self.loss_count:
            report = self._log_eval(metrics, progress)
        if step < self.step:  # the losses since the last record were of steps that are taken again
            self.loss_sum, self.loss_count = 0.0, 0
        self._move_to(step)
        if self.step >= stop_at:
            self._say(f"rejoined the servers, which had taken this worker's run to its end (step {step})")
            if report is None and not self.loss_count:  # no record left to write: the summary's figures
                report = self.evaluate()
            return True, report
        self._say(f"rejoined the servers at step {step}: continuing from epoch {self.epoch + 1}, batch {self.batch}")
        if leaving and not self.config.checkpoint_every:
            self.save()
        return False, report

    def _log_eval(self, metrics, progress):
        """Evaluate, and report it with the mean training loss since the last report (which it restarts)."""
        total, ranks = self.strategy.all_sum([self.loss_sum / self.loss_count, 1.0])
        train_loss = total / ranks
        self.loss_sum, self.loss_count = 0.0, 0
        test_loss, accuracy = self.evaluate()
        if not math.isfinite(test_loss):  # the last step's update diverged: its loss, taken before, was finite
            raise FloatingPointError(f"the test loss became {test_loss} at step {self.step}; lower the learning "
                                     "rate or set grad_clip")
        # the epoch the last step belongs to (after an epoch ends, self.epoch already counts the next one)
        epoch = self.epoch + 1 if self.batch else max(self.epoch, 1)
        metrics.write(step=self.step, epoch=epoch, train_loss=train_loss, test_loss=test_loss,
                      test_accuracy=accuracy, lr=self.lr_used)
        progress.line(f"epoch {epoch} step {self.step}: train loss {train_loss:.4f}, "
                      f"test loss {test_loss:.4f}, test accuracy {accuracy:.2%}")
        return test_loss, accuracy

    def sample(self, length, prompt="def "):
        """`length` characters sampled after `prompt`, the prompt included as it was used: its characters
        the text never had left out, or, if none is left, the text's first character."""
        vocab = self.split.meta["vocab"]
        index = {c: i for i, c in enumerate(vocab)}
        codes = [index[c] for c in prompt if c in index] or [0]
        out = self.model.generate(codes, length, temperature=0.8, rng=np.random.default_rng(self.config.seed))
        return "".join(vocab[c] for c in codes + out)


# Keys that may legitimately differ between ranks (file paths that only rank 0 writes; whether tracing is on
# must agree, as its events are gathered).
_PER_RANK_KEYS = {"metrics", "trace", "progress"}
# The running training loss of a checkpoint written before 2026-11-29, which did not keep it.
_NO_RUNNING_LOSS = {"sum": 0.0, "count": 0}


def _count(n, noun):
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _jsonable(state):
    """numpy's bit-generator state with numpy values as plain Python (JSON) values."""
    if isinstance(state, dict):
        return {k: _jsonable(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return state.tolist()
    if isinstance(state, np.generic):
        return state.item()
    return state


__all__ = ["Trainer", "LocalStep", "build_data", "build_model", "build_optimizer", "build_schedule",
           "DataError", "ConfigError", "CheckpointError"]
