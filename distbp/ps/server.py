"""One parameter-server shard: holds some of the parameters and their optimizer state, applies pushes.

Modes:
  sync     waits for a gradient from every taking-part worker for version t, averages them, steps, and
           serves version t+1; a worker that does not push within sync_timeout is dropped from that
           step (it rejoins by registering again);
  async    applies every push as it arrives, one optimizer step each;
  bounded  as async, but a worker may run at most `staleness` versions ahead of the slowest one: its
           pull waits until the others catch up.
"""

import hmac
import json
import logging
import math
import secrets
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ..autograd.tensor import Tensor
from ..optim.optimizer import axpy
from ..serialization import (
    CheckpointError, brief, brief_repr, check_finite, is_count, load_safetensors, save_safetensors,
)
from .v1 import ps_pb2, ps_pb2_grpc
from .wire import Assembler, WireError, chunk_ranges, decode_message, encode_chunks

log = logging.getLogger("distbp.ps")
MODES = ("sync", "async", "bounded")


class Shard:
    """The state of one shard and the rules of the chosen mode; the gRPC servicer is a thin layer on it."""

    def __init__(self, params, optimizer, schedule=None, mode="sync", workers=1, staleness=2, sync_timeout=60.0,
                 shard=0, num_shards=1, signature="", checkpoint=None, checkpoint_every=0, settings=None,
                 setting_keys=None, steps_per_worker=None, restore_keys=()):
        if mode not in MODES:
            raise ValueError(f"parameter server: mode must be one of {MODES}, not {mode!r}")
        if workers < 1:
            raise ValueError(f"parameter server: workers must be at least 1, got {workers}")
        self.params = params  # name -> Parameter (this shard's only)
        self.optimizer, self.schedule = optimizer, schedule
        self.ranges, self.pieces = self._cut_into_pieces(params, optimizer)
        self.mode, self.expected, self.staleness, self.sync_timeout = mode, workers, staleness, sync_timeout
        self.shard, self.num_shards, self.signature = shard, num_shards, signature
        self._model = _parse_signature(signature)  # what a worker's signature must equal, as JSON values
        self.settings = settings or {}  # training settings a worker must share (see register)
        # the keys a worker may send (None: any); the server's own settings leave out those that do not apply
        self.setting_keys = None if setting_keys is None else set(setting_keys) | set(self.settings)
        self.restore_keys = restore_keys  # settings a checkpoint must share with this server to be restored
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.expected_shapes = {n: (p.data.shape, p.data.dtype) for n, p in params.items()}
        self.cond = threading.Condition()
        self.version = 0
        self.pushes = 0
        self.active = set()  # worker ids taking part
        self.clocks = {}  # worker id -> pushes applied (bounded staleness)
        # worker id -> its pushes applied in all (async and bounded; checkpointed): a worker that starts
        # again with that id takes up its run there, as its step count (sync: the version)
        self.steps_done = {}
        # a worker's run, in pushes (None: not known): one that has made them all no longer paces the others
        self.steps_per_worker = steps_per_worker
        # (worker id, registration) -> number of its last push applied, kept for the step, or skipped. Pushes
        # without a registration (0: clients that do not send it) have a slot of their own, so that their
        # numbers cannot make the registered worker's own pushes look like retries
        self.sequences = {}
        self.skipping = set()  # workers retaking steps (async, bounded) or rounds (sync) this shard has (logged once)
        # steps_done estimated from an older checkpoint (kept in this shard's own checkpoints): a step a count
        # covers may never have been applied, so none is skipped
        self.steps_guessed = False
        self.registrations = {}  # worker id -> the token of its latest registration (random, never 0)
        self.pending = {}  # sync: worker id -> gradients for the current version
        self.step_started = None
        self._encoded = None  # the current version's _Encoding, made by its first pull
        self.started = False  # sync and bounded: the first version is served once every worker joined
        self.waiting_since = None  # restarted, not started: when the first worker rejoined (see _drop_stragglers)
        self.restored = False  # restarted from a checkpoint
        self.last_push = {}  # worker id -> time of its last push or registration (bounded: finds the dead)
        self.stopping = False
        if checkpoint and Path(checkpoint).exists():
            self.restore(checkpoint)
        # the thread holds the shard weakly: a shard that is dropped without stop() (one that never served)
        # is collected, and the thread ends
        self._monitor = threading.Thread(target=_watch_stragglers, args=(weakref.ref(self),), daemon=True,
                                         name="distbp-ps-monitor")
        self._monitor.start()

    # --- membership ---

    def register(self, requested_id, signature, settings=None):
        """(worker id, registration token) for a joining worker."""
        if _parse_signature(signature) != self._model:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           "the worker's model differs from the server's (parameter names, shapes or dtypes; "
                           "the server's is in StatusReply.signature)")
        unknown = sorted(set(settings or {}) - self.setting_keys) if self.setting_keys is not None else []
        if unknown:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown settings {brief_repr(unknown)}; known: {sorted(self.setting_keys)}")
        for key, value in (settings or {}).items():
            if key == "data" and key in self.settings and value != self.settings[key]:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the worker's training data differs from the server's (fingerprints "
                               f"{brief(str(value))} and {self.settings[key]}): every machine's copy of the data set "
                               "must be the same")
            if key in self.settings and not _same_setting(self.settings[key], value):
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the worker has {key} = {brief_repr(value)} but the server "
                               f"{self.settings[key]!r}: give the servers and the workers the same training options")
        if requested_id < -1:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"worker id {requested_id} is neither an id nor -1 (any free id)")
        with self.cond:
            if requested_id >= 0:
                if requested_id >= self.expected:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"worker id {requested_id} is out of range for {self.expected} workers")
                wid = requested_id
            else:
                free = [i for i in range(self.expected) if i not in self.active]
                if not free:
                    raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"all {self.expected} worker ids are taken; a restarted worker rejoins "
                                   "with its own id (--ps-worker-id)")
                wid = free[0]
            self.active.add(wid)
            for key in [k for k in self.sequences if k[0] == wid]:  # the worker numbers its pushes from 1 again
                del self.sequences[key]
            self.skipping.discard(wid)
            # random, not counted: a token from before a server restart cannot match by chance
            self.registrations[wid] = secrets.randbits(63) + 1
            self.clocks[wid] = max(self.clocks.values(), default=0) if self.started else 0
            self.last_push[wid] = time.monotonic()
            if len(self.active) >= self.expected:
                self.started = True
            elif not self.started and self.restored and self.waiting_since is None:
                self.waiting_since = time.monotonic()  # after a restart, the missing may never come back
            log.info("shard %d: worker %d joined (%d taking part)", self.shard, wid, len(self.active))
            self.cond.notify_all()
            return wid, self.registrations[wid], self.worker_steps(wid)

    def worker_steps(self, wid):
        """The training steps worker `wid` has behind it on this shard (lock held)."""
        return self.version if self.mode == "sync" else self.steps_done.get(wid, 0)

    # --- the optimizer's pieces ---

    @staticmethod
    def _cut_into_pieces(params, optimizer):
        """The optimizer steps chunk-sized pieces: flat views of each parameter, cut where encode_chunks cuts
        a gradient. A pushed chunk is then a piece's gradient as it arrived, read in place from the message:
        no gradient byte is copied on the server. (The optimizers are elementwise, so pieces step exactly
        as whole parameters.)"""
        ranges, pieces, piece_of = {}, {}, {}
        for name, p in params.items():
            if not p.data.flags.c_contiguous:
                p.data = np.ascontiguousarray(p.data)
            flat = p.data.reshape(-1)
            ranges[name] = chunk_ranges(flat.size, flat.itemsize)
            pieces[name] = [Tensor(flat[a:b], requires_grad=True, dtype=flat.dtype) for a, b in ranges[name]]
            piece_of[id(p)] = pieces[name]
        if optimizer.state:
            raise ValueError("parameter server: the optimizer must be new (no state yet); restore() loads state")
        if any(id(p) not in piece_of for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("parameter server: the optimizer holds parameters that are not this shard's")
        for group in optimizer.param_groups:
            group["params"] = [piece for p in group["params"] for piece in piece_of[id(p)]]
        return ranges, pieces

    # --- pushes ---

    def push(self, worker_id, version, chunks, sequence=0, registration=0, step=0):
        """Validate a whole push, then apply it (async) or keep it for the step (sync); returns the version.

        sequence: the worker's push number (0: not numbered). A number already applied is a retry whose
        reply was lost: it is not applied again.
        registration: the token of the registration the push belongs to (0: not checked). Another one than
        the worker id's latest means another process has registered as this worker since: refused.
        step: the push's place in the worker's run, from 1 (0: not given). Async and bounded: a step this
        shard has applied is not applied again (see _applied_here).
        """
        with self.cond:  # before the stream is read: a push that will be refused holds no memory meanwhile
            self._check_sender(worker_id, registration)
            registration_at_start = self.registrations.get(worker_id)  # a push in flight across a re-registration
        assembler = Assembler(self.expected_shapes, copy=False)
        try:
            for chunk in chunks:
                values = assembler.add(chunk)
                # checked as each chunk arrives, while it is in cache: g.g is finite for every finite
                # gradient short of overflow (one BLAS pass); only when it is not is the exact check needed
                with np.errstate(over="ignore"):  # a finite gradient may overflow g.g: the exact check decides
                    rough = float(np.dot(values, values))
                if not math.isfinite(rough) and not np.isfinite(values).all():
                    raise WireError(f"{chunk.name} has non-finite values")
            grads = {name: self._piece_gradients(name, segments) for name, segments in assembler.segments().items()}
        except WireError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad push from worker {worker_id}: {e}") from None
        with self.cond:
            if self.stopping:  # after the final checkpoint: the push would be acknowledged, then lost
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry after its restart")
            self._check_sender(worker_id, registration)
            if self.registrations.get(worker_id) != registration_at_start:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"worker {worker_id} registered again while this push was in flight: not applied")
            self._check_version(worker_id, version)  # a retry's too: it is acknowledged below
            slot = (worker_id, registration)  # see self.sequences
            if sequence and sequence <= self.sequences.get(slot, 0):
                log.info("shard %d: worker %d sent push %d again; it was applied once", self.shard, worker_id, sequence)
                self.last_push[worker_id] = time.monotonic()  # alive: bounded mode must not drop it
                return self.version
            if self.mode == "sync" and worker_id in self.pending and version == self.version:
                # the same push again: a retry whose first reply was lost. It counts once, as the first.
                log.info("shard %d: worker %d pushed for version %d again; the first push counts",
                         self.shard, worker_id, version)
                return self.version
            if self.mode == "sync" and version != self.version:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"stale push: computed at version {version}, the server is at {self.version}")
            if self.mode == "sync" and not self.started:  # a step now would average fewer workers than the job's
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the job has not started: {len(self.active)} of {self.expected} workers have "
                               "registered (a worker pulls first: its pull waits for them)")
            skip = bool(step) and (self._round_taken(worker_id, step) if self.mode == "sync"
                                   else self._applied_here(worker_id, step))  # (or refused)
            if sequence:
                self.sequences[slot] = sequence
            if skip:
                return self.version
            if self.mode == "sync":
                if not self.pending:
                    self.step_started = time.monotonic()
                self.pending[worker_id] = grads
                if self.active <= set(self.pending):
                    self._step(list(self.pending.values()))
            else:
                # counted first: the step may write the periodic checkpoint, which must hold this push's count
                self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1
                self.steps_done[worker_id] = self.steps_done.get(worker_id, 0) + 1
                self._step([grads])
            self.last_push[worker_id] = time.monotonic()
            self.pushes += 1
            return self.version

    def _check_sender(self, worker_id, registration):
        """Refuse a push from a worker that is not taking part, or from a registration that is no longer its
        (lock held)."""
        if worker_id not in self.active:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"worker {worker_id} is not taking part (register again to rejoin)")
        if registration and registration != self.registrations.get(worker_id):
            raise _Refused(grpc.StatusCode.ABORTED,
                           f"worker {worker_id} has been registered again since this worker registered (by "
                           "another process given the same id, or one that replaced this one while it was "
                           "stalled): this process must stop")

    def _round_taken(self, worker_id, step):
        """(sync; lock held) Whether step `step` of the worker's run is a round this shard has taken (version
        V is the V-th round): the worker goes on from where another shard has its run (one that stopped
        before taking the round, or was restored from an older checkpoint). Applied again, the round
        would count twice here: it is acknowledged and skipped, and the pull gets the current version."""
        if step > self.version:
            self.skipping.discard(worker_id)
            return False
        self._skip(worker_id, "shard %d: worker %d goes on from step %d of its run, and this shard has taken %d "
                   "rounds: it skips those up to its own", self.shard, worker_id, step - 1, self.version)
        return True

    def _skip(self, worker_id, warning, *args):
        """(lock held) A push of a step this shard has: the worker is alive, and the first of a run of them
        is logged."""
        if worker_id not in self.skipping:
            self.skipping.add(worker_id)
            log.warning(warning, *args)
        self.last_push[worker_id] = time.monotonic()

    def _applied_here(self, worker_id, step):
        """(async, bounded; lock held) Whether step `step` of the worker's run was applied on this shard
        before: the worker went back to where another shard has its run. It counts as the worker's step
        for pacing, as it is on the other shards. A step past the next one is refused: its retries, and
        the steps skipped, could not be told apart."""
        done = self.steps_done.get(worker_id, 0)
        if step > done + 1:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"bad push from worker {worker_id}: step {step} of its run, but this shard has applied "
                           f"{done} of its pushes (a worker goes on from the fewest RegisterReply.steps)")
        if step == done + 1 or self.steps_guessed:  # a guessed count may be too high: applied, not skipped
            self.skipping.discard(worker_id)
            return False
        self._skip(worker_id, "shard %d: worker %d goes on from step %d of its run, and this shard has applied its "
                   "steps up to %d: those are not applied again", self.shard, worker_id, step - 1, done)
        self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1
        self.cond.notify_all()  # bounded: a worker waiting for this one to catch up may go on
        return True

    def _piece_gradients(self, name, segments):
        """One gradient array per piece of `name`: the received chunks themselves when they were cut as
        encode_chunks cuts (always, from distbp's client), else slices of one copy."""
        ranges = self.ranges[name]
        if len(segments) == len(ranges) and all(o == a for (o, _), (a, _) in zip(segments, ranges)):
            return [values for _, values in segments]
        flat = np.empty(ranges[-1][1], self.expected_shapes[name][1])
        for offset, values in segments:
            flat[offset:offset + values.size] = values
        return [flat[a:b] for a, b in ranges]

    def _check_version(self, worker_id, version):
        """Refuse a push computed at a version this shard has not served (lock held)."""
        if version < 0 or version > self.version:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"bad push from worker {worker_id}: version {version} is not in [0, {self.version}]")

    def _step(self, contributions):
        """Average the contributions, take one optimizer step, publish the next version (lock held).

        contributions: [name -> [gradient per piece]]; the arrays may be read-only views of messages.
        """
        self._retire_encoding()
        scale = 1.0 / len(contributions)
        for name, pieces in self.pieces.items():
            for k, piece in enumerate(pieces):
                grad = contributions[0][name][k]
                if len(contributions) > 1:  # scaled before they are added: finite gradients have a finite mean
                    grad = grad * grad.dtype.type(scale)  # a new array: ours to add into
                    for c in contributions[1:]:
                        axpy(scale, c[name][k], grad)
                piece.grad = Tensor._from_op(grad, None)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.schedule is not None:
            self.schedule.step()
        self.version += 1
        self.pending = {}
        self.step_started = None
        self.cond.notify_all()
        if self.checkpoint and self.checkpoint_every and self.version % self.checkpoint_every == 0:
            try:
                self.save(self.checkpoint)
            except (OSError, CheckpointError) as e:  # the step stands; training goes on without this save
                log.error("shard %d: could not write the checkpoint of version %d: %s", self.shard, self.version, e)

    def _drop_stragglers(self, now):
        """(lock held) Workers that hold the others up for longer than sync_timeout stop taking part."""
        if self.stopping:  # the final checkpoint is written or being written: no step may follow it
            return
        if not self.started and self.waiting_since is not None and now - self.waiting_since >= self.sync_timeout:
            # a restarted server whose missing workers never come back (dropped before): go on without them
            log.warning("shard %d: starting with worker(s) %s of %d: the others did not join within %g s",
                        self.shard, sorted(self.active), self.expected, self.sync_timeout)
            self.started, self.waiting_since = True, None
            self.cond.notify_all()
        if self.mode == "sync" and self.step_started is not None and now - self.step_started >= self.sync_timeout:
            late = sorted(self.active - set(self.pending))
            for wid in late:
                self.active.discard(wid)
            log.warning("shard %d: dropped worker(s) %s from version %d: no push within %g s",
                        self.shard, late, self.version, self.sync_timeout)
            self._step(list(self.pending.values()))
        pacing = self._pacing() if self.mode == "bounded" else None
        if pacing:
            clocks = {w: self.clocks.get(w, 0) for w in pacing}
            slowest = min(clocks.values())
            if max(clocks.values()) - slowest > self.staleness:  # someone waits for the slowest
                late = sorted(w for w, c in clocks.items()
                              if c == slowest and now - self.last_push.get(w, now) >= self.sync_timeout)
                for wid in late:
                    self.active.discard(wid)
                if late:
                    log.warning("shard %d: dropped worker(s) %s: no push within %g s while others waited for "
                                "them", self.shard, late, self.sync_timeout)
                    self.cond.notify_all()

    def _pacing(self):
        """The workers that bounded staleness keeps the others within reach of (lock held): those taking
        part that have not finished their run (a finished one never pushes again: waiting for it would
        hold a restarted worker, whose clock starts at the others', until it is dropped)."""
        if self.steps_per_worker is None:
            return self.active
        return {w for w in self.active if self.steps_done.get(w, 0) < self.steps_per_worker}

    # --- pulls ---

    def _retire_encoding(self):
        """Before the parameters change (lock held): pulls still sending the current version finish it with
        its own values, and the next pull encodes the new one."""
        if self._encoded is not None:
            self._encoded.finish()
            self._encoded = None

    def pull_messages(self, worker_id, min_version, is_active):
        """Block until this worker may read parameters of version >= min_version; return an iterator over
        them as serialized PullReplies.

        A version is encoded once, message by message as its first reader reaches each, and the messages are
        kept until the next step: the other workers of a synchronous step are served the same bytes, and the
        first message is on the wire while the next is encoded. No pull holds the lock while it sends.
        """
        with self.cond:
            # sync: one round at a time; async and bounded: every worker taking part may push once meanwhile
            reachable = self.version + (1 if self.mode == "sync" else max(len(self.active), 1))
            if min_version > reachable:  # no push can lead there before this worker's next: it would wait for ever
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"version {min_version} is in the future: the server is at {self.version}, and at "
                               f"most {reachable} can come before this worker pushes again")
            while True:
                ready = self.version >= min_version and (self.started or self.mode == "async")
                if ready and self.mode == "bounded" and worker_id in self.clocks:
                    pacing = self._pacing()
                    if pacing:
                        slowest = min(self.clocks.get(w, 0) for w in pacing)
                        ready = self.clocks[worker_id] - slowest <= self.staleness
                if worker_id not in self.active:
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"worker {worker_id} is not taking part (register again to rejoin)")
                if ready:
                    if self._encoded is None:
                        self._encoded = _Encoding(self.version, self.params)
                    return self._encoded.reader(self.cond)
                if self.stopping:  # UNAVAILABLE: the worker retries, and rejoins the restarted server
                    raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                if not is_active():
                    raise _Refused(grpc.StatusCode.CANCELLED, "the pull was cancelled")
                self.cond.wait(0.5)

    # --- checkpoints ---

    def save(self, path):
        """Parameters, optimizer state and version, atomically (safetensors + JSON metadata).

        Optimizer state is saved per whole parameter (the pieces' state joined), so the file does not
        depend on the chunk size.
        """
        arrays = {f"param/{n}": p.data for n, p in self.params.items()}
        scalars = {}
        for name, pieces in self.pieces.items():
            states = [self.optimizer.state.get(piece) for piece in pieces]
            if not all(states):
                continue  # no step yet
            for key, value in states[0].items():
                if isinstance(value, np.ndarray):
                    whole = np.concatenate([state[key] for state in states])
                    arrays[f"optim/{name}/{key}"] = whole.reshape(self.params[name].data.shape)
                else:
                    scalars.setdefault(name, {})[key] = value
        meta = {"version": self.version, "mode": self.mode, "shard": self.shard, "num_shards": self.num_shards,
                "scalars": scalars,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "signature": self.signature, "steps_done": {str(w): n for w, n in self.steps_done.items()},
                "settings": self.settings, "workers": self.expected}
        if self.steps_guessed:  # still estimates, after a restart too (see _applied_here)
            meta["steps_guessed"] = True
        check_finite(path, arrays, "param/", writing=True)
        save_safetensors(path, arrays, {"distbp-ps": json.dumps(meta)})
        log.info("shard %d: checkpoint of version %d written to %s", self.shard, self.version, path)

    def restore(self, path):
        """Load a checkpoint written by save(); everything is checked before anything changes."""
        arrays, metadata = load_safetensors(path)
        try:
            meta = json.loads(metadata["distbp-ps"])
            version, scalars = meta["version"], meta["scalars"]
        except (KeyError, TypeError, ValueError, RecursionError):  # (JSON nested too deep, a 4300-digit number)
            raise CheckpointError(f"{path}: not a distbp parameter-server checkpoint") from None
        check_finite(path, arrays, "param/")
        if meta.get("signature") != self.signature or meta.get("shard") != self.shard:
            raise CheckpointError(f"{path}: checkpoint of another model or shard")
        saved = {k.split("/", 1)[1] for k in arrays if k.startswith("param/")}
        if meta.get("num_shards", self.num_shards) != self.num_shards or saved != set(self.params):
            raise CheckpointError(f"{path}: checkpoint of shard {meta.get('shard')} of {meta.get('num_shards', '?')} "
                                  f"(parameters {sorted(saved)}), this server is shard {self.shard} of "
                                  f"{self.num_shards} (parameters {sorted(self.params)})")
        if not is_count(version):
            raise CheckpointError(f"{path}: damaged checkpoint: version {version!r} is not an integer >= 0")
        self._check_same_run(path, meta)
        if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
            raise CheckpointError(f"{path}: damaged checkpoint: the optimizer counters are not objects by parameter")
        steps_done, steps_guessed = self._check_steps_done(path, meta, version)
        schedule = meta.get("schedule") if self.schedule is not None else None
        if self.schedule is not None and version and schedule is None:  # it would start over from step 0
            raise CheckpointError(f"{path}: damaged checkpoint: version {version} without the schedule's state")
        if schedule is not None:
            try:
                _, base_lrs = self.schedule.check_state_dict(schedule)
                if base_lrs != self.schedule.base_lrs:  # the settings compared above say which rate
                    raise ValueError(f"the schedule's base rates are {base_lrs}, this server's "
                                     f"{self.schedule.base_lrs}")
            except ValueError as e:
                raise CheckpointError(f"{path}: damaged checkpoint: {e}") from None
        state = {}
        for name, p in self.params.items():
            value = arrays.get(f"param/{name}")
            if value is None or value.shape != p.data.shape or value.dtype != p.data.dtype:
                raise CheckpointError(f"{path}: parameter {name!r} is missing or has another shape or dtype")
            entries = {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"optim/{name}/")}
            entries.update(scalars.get(name, {}))
            try:  # the state of the whole parameter, as save() joined it, before it is cut into pieces
                self.optimizer.check_param_state(entries, p, f"parameter {name!r}")
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: does not fit this shard's optimizer: {e}") from None
            for piece, (a, b) in zip(self.pieces[name], self.ranges[name]):
                dtype = self.optimizer.state_dtype(p)
                piece_state = {k: (v.reshape(-1)[a:b].astype(dtype) if isinstance(v, np.ndarray) else v)
                               for k, v in entries.items()}
                if piece_state:
                    state[piece] = piece_state
        self._retire_encoding()
        for name, p in self.params.items():
            p.data[...] = arrays[f"param/{name}"]
        self.optimizer.state = state
        if schedule is not None:
            self.schedule.load_state_dict(schedule)
        self.version = version
        self.steps_done, self.steps_guessed = steps_done, steps_guessed
        self.started = False  # wait for the workers to come back (sync_timeout at most once one has)
        self.waiting_since = None
        self.restored = True
        log.info("shard %d: restored version %d from %s", self.shard, self.version, path)

    def _check_same_run(self, path, meta):
        """Refuse a checkpoint of a run with other settings or another number of workers: its optimizer state
        and schedule would silently replace this server's (checkpoints before 2026-11-29 do not say)."""
        saved = meta.get("settings")
        if isinstance(saved, dict):
            for key in self.restore_keys:
                if key in saved and key in self.settings and not _same_setting(saved[key], self.settings[key]):
                    if key == "data":
                        raise CheckpointError(f"{path}: written on other training data (fingerprint {saved[key]}) "
                                              f"than this server's ({self.settings[key]}): restart with the run's "
                                              "data, or give a new --checkpoint-path to start another run")
                    raise CheckpointError(f"{path}: written with {key} = {saved[key]!r}, this server has "
                                          f"{self.settings[key]!r}: restart with the run's settings, or give a new "
                                          "--checkpoint-path to start another run")
        workers = meta.get("workers")
        if workers is not None and workers != self.expected:
            raise CheckpointError(f"{path}: written by a server of {workers!r} workers, this one has {self.expected}: "
                                  "the data shards and the schedule depend on it")

    def _check_steps_done(self, path, meta, version):
        """(pushes applied per worker id, whether they are estimates) from the checkpoint (async and bounded:
        they add up to the version)."""
        saved_mode = meta.get("mode", self.mode)
        if saved_mode not in MODES:
            raise CheckpointError(f"{path}: damaged checkpoint: mode {brief_repr(saved_mode)} is not one of {MODES}")
        if (saved_mode == "sync") != (self.mode == "sync"):
            raise CheckpointError(f"{path}: checkpoint of a {saved_mode} server, this one is {self.mode}: a sync "
                                  "version is one step of every worker, an async one a single push")
        raw = meta.get("steps_done")
        if raw is None:  # written before 2026-11-29: each worker's share of the pushes, as near as can be told
            if self.mode == "sync":
                return {}, False
            if version:
                log.warning("shard %d: the checkpoint does not say how many pushes each worker made (an older "
                            "format): each worker goes on from about version / workers = %d", self.shard,
                            version // self.expected)
            share, rest = divmod(version, self.expected)  # the counts still add up to the version
            return {w: share + (w < rest) for w in range(self.expected)}, True
        guessed = meta.get("steps_guessed", False)
        if not isinstance(guessed, bool):
            raise CheckpointError(f"{path}: damaged checkpoint: steps_guessed {guessed!r} is not true or false")
        ids = {}
        if isinstance(raw, dict):
            for key, count in raw.items():
                if key.isascii() and key.isdecimal() and int(key) < self.expected and str(int(key)) == key \
                        and is_count(count) and count <= version:
                    ids[int(key)] = count
        if not isinstance(raw, dict) or len(ids) != len(raw) or (self.mode != "sync" and sum(ids.values()) != version):
            raise CheckpointError(f"{path}: damaged checkpoint: steps_done {raw!r} is not, for worker ids below "
                                  f"{self.expected}, push counts adding up to the version {version}")
        return ids, guessed

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


def _watch_stragglers(shard_ref):
    """The straggler monitor of the shard `shard_ref` refers to, until the shard stops or is collected."""
    while True:
        time.sleep(0.05)
        shard = shard_ref()
        if shard is None or shard.stopping:
            return
        with shard.cond:
            try:
                shard._drop_stragglers(time.monotonic())
            except Exception:  # the monitor must outlive any one failure, or no one is ever dropped again
                log.exception("shard %d: the straggler monitor failed; it goes on", shard.shard)
        del shard


class _Encoding:
    """The PullReplies of one version, encoded in order as readers first reach them (under the shard's lock).

    The shard calls finish() before it changes the parameters, so a reader still sending this version
    gets this version's values to the end.
    """

    def __init__(self, version, params):
        self.messages = []
        self._source = (m for n, p in params.items() for m in encode_chunks(n, p.data, [(1, version)], 2))

    def _message(self, i):
        """Message i, encoding up to it if needed (lock held); None past the last one."""
        while len(self.messages) <= i and self._source is not None:
            message = next(self._source, None)
            if message is None:
                self._source = None
            else:
                self.messages.append(message)
        return self.messages[i] if i < len(self.messages) else None

    def finish(self):
        self._message(math.inf)

    def reader(self, lock):
        i = 0
        while True:
            with lock:
                message = self._message(i)
            if message is None:
                return
            yield message
            i += 1


def _parse_signature(text):
    """A model signature, JSON [[name, shape, dtype], ...], as a comparable value (so that any JSON
    encoder's spacing and number spelling give the same); INVALID_ARGUMENT when it is not one."""
    if not text:
        return ()  # no parameters (a server built without a signature, in tests)
    try:
        value = json.loads(text)
        parsed = tuple((name, tuple(_json_int(k) for k in shape), dtype) for name, shape, dtype in value)
        if all(isinstance(n, str) and isinstance(d, str) for n, _, d in parsed):
            return parsed
    except (ValueError, TypeError, RecursionError):
        pass
    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                   "the registration's signature is not JSON [[name, shape, dtype], ...] (see StatusReply.signature)")


def _json_int(value):
    """A JSON number that is an integer (64 and 64.0 are the same JSON value; true is not a number)."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise TypeError("not an integer")


def _same_setting(a, b):
    """Settings compare as JSON values: true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


class _Refused(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Servicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, shard):
        self.shard = shard

    def Register(self, data, context):
        request = _parsed(ps_pb2.RegisterRequest, data, context)
        try:
            try:
                settings = json.loads(request.settings) if request.settings else None
            except RecursionError:
                raise ValueError("nested too deeply") from None
            if settings is not None and not isinstance(settings, dict):
                raise ValueError("not a JSON object")
            wid, registration, steps = self.shard.register(request.requested_id, request.signature, settings)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad settings in the registration: {e}")
        except _Refused as e:
            context.abort(e.code, e.message)
        s = self.shard
        return ps_pb2.RegisterReply(worker_id=wid, num_workers=s.expected, version=s.version, mode=s.mode,
                                    registration=registration, steps=steps,
                                    shard=s.shard, num_shards=s.num_shards)

    def Push(self, request_iterator, context):
        """Serialized PushRequests (see wire.py: decoded by hand, the tensor bytes read in place)."""
        try:
            _, _, version, _ = self._push(request_iterator)
        except _Refused as e:
            context.abort(e.code, e.message)
        return ps_pb2.PushReply(version=version)

    def Pull(self, data, context):
        """Serialized PullReplies, encoded by hand (see wire.py)."""
        request = _parsed(ps_pb2.PullRequest, data, context)
        try:
            messages = self.shard.pull_messages(request.worker_id, request.min_version, context.is_active)
        except _Refused as e:
            context.abort(e.code, e.message)
        yield from messages

    def PushPull(self, request_iterator, context):
        """A push, then the pull it makes possible, in one call."""
        try:
            worker_id, computed_at, _, step = self._push(request_iterator)
            wanted = 0
            if self.shard.mode == "sync":  # the version of its round: the next, or (a round taken) one already here
                wanted = min(computed_at + 1, step) if step else computed_at + 1
            messages = self.shard.pull_messages(worker_id, wanted, context.is_active)
        except _Refused as e:
            context.abort(e.code, e.message)
        yield from messages

    def _push(self, request_iterator):
        """Apply one streamed push; (worker id, version the gradient was computed at, version after, the step of
        the worker's run it says it is, 0 if none)."""
        first = None

        def chunks():
            nonlocal first
            for data in request_iterator:
                try:
                    head, chunk = decode_message(data, _PUSH_INTS, 3, unsigned=_PUSH_UINT64, int32=(1,))
                except WireError as e:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad push: {e}") from None
                if first is None:
                    first = head
                elif head != first:
                    field = next(k for k in _PUSH_INTS.values() if head[k] != first[k])
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"bad push: {field} is {first[field]} in its first message and {head[field]} in a "
                                   "later one (every message of a push carries the same worker_id, version, "
                                   "sequence, registration and step)")
                yield chunk

        gen = chunks()
        head = next(gen, None)
        if head is None:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad push: no tensors")
        version = self.shard.push(first["worker_id"], first["version"], _prepend(head, gen), first["sequence"],
                                  first["registration"], first["step"])
        return first["worker_id"], first["version"], version, first["step"]

    def Status(self, data, context):
        _parsed(ps_pb2.StatusRequest, data, context)
        s = self.shard
        with s.cond:
            return ps_pb2.StatusReply(version=s.version, mode=s.mode, workers=sorted(s.active), pushes=s.pushes,
                                      shard=s.shard, num_shards=s.num_shards, parameters=list(s.params),
                                      signature=s.signature)


_PUSH_INTS = {1: "worker_id", 2: "version", 4: "sequence", 5: "registration", 6: "step"}
_PUSH_UINT64 = (4, 5, 6)


def _identity(data):
    return data


def _parsed(message_class, data, context):
    """The request parsed here, not by gRPC: malformed bytes are the client's error (INVALID_ARGUMENT, naming
    the message), where gRPC answers INTERNAL and logs a traceback."""
    try:
        return message_class.FromString(data)
    except DecodeError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a malformed {message_class.DESCRIPTOR.name}")


def _add_servicer(servicer, server):
    """The generated registration, except that Push, Pull and PushPull see and make serialized bytes."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register, request_deserializer=_identity,
            response_serializer=ps_pb2.RegisterReply.SerializeToString),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=_identity, response_serializer=ps_pb2.PushReply.SerializeToString),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=_identity, response_serializer=_identity),
        "PushPull": grpc.stream_stream_rpc_method_handler(
            servicer.PushPull, request_deserializer=_identity, response_serializer=_identity),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=_identity,
            response_serializer=ps_pb2.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("distbp.ps.v1.ParameterServer", handlers),))


def _prepend(head, rest):
    yield head
    yield from rest


class _TokenCheck(grpc.ServerInterceptor):
    """Every call to the parameter-server service must carry `authorization: Bearer <token>` (the scheme's
    case does not matter, as in HTTP)."""

    def __init__(self, token):
        check_token(token)
        self.token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream_in = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream_out = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_streams = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if not details.method.startswith("/distbp.ps.v1.ParameterServer/"):
            return continuation(details)  # health checks and reflection stay open
        given = [value for key, value in details.invocation_metadata if key == "authorization"]
        if len(given) == 1 and self._carries_token(given[0]):  # (of two, which would count?)
            return continuation(details)
        if details.method.endswith("/Push"):
            return self._deny_stream_in
        if details.method.endswith("/Pull"):
            return self._deny_stream_out
        if details.method.endswith("/PushPull"):
            return self._deny_streams
        return self._deny_unary

    def _carries_token(self, header):
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(" ").encode(), self.token)


def host_port(host, port):
    """HOST:PORT as gRPC and a worker's --ps take it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_token(token, what="the token"):
    """ValueError unless `token` can travel as `authorization: Bearer <token>` and match there."""
    if not token or token != token.strip():
        raise ValueError(f"{what} must be non-empty, without spaces at either end (the metadata "
                         "`authorization: Bearer T` cannot carry them)")


MESSAGE_LIMIT = 16 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]


def serve(shard, host="127.0.0.1", port=0, token=None, tls=None, threads=None):
    """Start a gRPC server for `shard`; returns (server, bound port). tls: dict(cert, key, client_ca=None)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    interceptors = [_TokenCheck(token)] if token else []
    # pulls park a handler thread each while they wait for the next version: more threads than workers
    pool = futures.ThreadPoolExecutor(max_workers=threads or max(16, 4 * shard.expected + 8))
    # no SO_REUSEPORT: a second server on a taken port must fail, not silently share it
    server = grpc.server(pool, interceptors=interceptors, options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    _add_servicer(Servicer(shard), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
    for name in ("", service):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = host_port(host, port)
    try:
        bound = _bind(server, address, tls)
    except RuntimeError:  # grpc's way of saying the port is taken, or that the certificate or key is bad
        why = "the address is in use or not this machine's" + (
            ", or the TLS certificate and key do not belong together" if tls else "")
        raise OSError(f"cannot listen on {address}: {why}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, bound


def _bind(server, address, tls):
    if tls:
        key, cert = Path(tls["key"]).read_bytes(), Path(tls["cert"]).read_bytes()
        client_ca = Path(tls["client_ca"]).read_bytes() if tls.get("client_ca") else None
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)
