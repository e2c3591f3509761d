"""One parameter-server shard: holds some of the parameters and their optimizer state, applies pushes.

Modes:
  sync     waits for a gradient from every taking-part worker for version t, averages them, steps, and
           serves version t+1; a worker that does not push within sync_timeout is dropped from that
           step (it rejoins by registering again);
  async    applies every push as it arrives, one optimizer step each;
  bounded  as async, but a worker may run at most `staleness` versions ahead of the slowest one: its
           pull waits until the others catch up.
"""

import json
import logging
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from ..autograd.tensor import Tensor
from ..serialization import CheckpointError, load_safetensors, save_safetensors
from .v1 import ps_pb2, ps_pb2_grpc
from .wire import Assembler, WireError, decode_message, encode_chunks

log = logging.getLogger("distbp.ps")
MODES = ("sync", "async", "bounded")


class Shard:
    """The state of one shard and the rules of the chosen mode; the gRPC servicer is a thin layer on it."""

    def __init__(self, params, optimizer, schedule=None, mode="sync", workers=1, staleness=2, sync_timeout=60.0,
                 shard=0, num_shards=1, signature="", checkpoint=None, checkpoint_every=0):
        if mode not in MODES:
            raise ValueError(f"parameter server: mode must be one of {MODES}, not {mode!r}")
        if workers < 1:
            raise ValueError(f"parameter server: workers must be at least 1, got {workers}")
        self.params = params  # name -> Parameter (this shard's only)
        self.optimizer, self.schedule = optimizer, schedule
        self.mode, self.expected, self.staleness, self.sync_timeout = mode, workers, staleness, sync_timeout
        self.shard, self.num_shards, self.signature = shard, num_shards, signature
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.expected_shapes = {n: (p.data.shape, p.data.dtype) for n, p in params.items()}
        self.cond = threading.Condition()
        self.version = 0
        self.pushes = 0
        self.active = set()  # worker ids taking part
        self.clocks = {}  # worker id -> pushes applied (bounded staleness)
        self.pending = {}  # sync: worker id -> gradients for the current version
        self.step_started = None
        self.started = False  # sync and bounded: the first version is served once every worker joined
        self.stopping = False
        if checkpoint and Path(checkpoint).exists():
            self.restore(checkpoint)
        self._monitor = threading.Thread(target=self._watch_stragglers, daemon=True, name="distbp-ps-monitor")
        self._monitor.start()

    # --- membership ---

    def register(self, requested_id, signature):
        if signature != self.signature:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           "the worker's model differs from the server's (parameter names, shapes or dtypes)")
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
            self.clocks[wid] = max(self.clocks.values(), default=0) if self.started else 0
            if len(self.active) >= self.expected:
                self.started = True
            log.info("shard %d: worker %d joined (%d taking part)", self.shard, wid, len(self.active))
            self.cond.notify_all()
            return wid

    # --- pushes ---

    def push(self, worker_id, version, chunks):
        assembler = Assembler(self.expected_shapes)
        try:
            for chunk in chunks:
                assembler.add(chunk)
            grads = assembler.result()
        except WireError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad push from worker {worker_id}: {e}") from None
        for name, g in grads.items():
            flat = g.reshape(-1)
            # g.g is finite for every finite gradient short of overflow (one BLAS pass); only when it is
            # not is the exact, slower check needed
            if not math.isfinite(float(np.dot(flat, flat))) and not np.isfinite(flat).all():
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"bad push from worker {worker_id}: {name} has non-finite values")
        with self.cond:
            if worker_id not in self.active:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"worker {worker_id} is not taking part (register again to rejoin)")
            if version < 0 or version > self.version:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"bad push from worker {worker_id}: version {version} is not in [0, {self.version}]")
            if self.mode == "sync":
                if version != self.version:
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"stale push: computed at version {version}, the server is at {self.version}")
                if worker_id in self.pending:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"bad push: worker {worker_id} already pushed for version {version}")
                if not self.pending:
                    self.step_started = time.monotonic()
                self.pending[worker_id] = grads
                if self.active <= set(self.pending):
                    self._step(list(self.pending.values()))
            else:
                self._step([grads])
                self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1
            self.pushes += 1
            return self.version

    def _step(self, contributions):
        """Average the contributions, take one optimizer step, publish the next version (lock held)."""
        scale = 1.0 / len(contributions)
        for name, p in self.params.items():
            total = contributions[0][name]  # assembled for this step alone: ours to modify
            for c in contributions[1:]:
                total += c[name]
            if len(contributions) > 1:
                total *= total.dtype.type(scale)
            p.grad = Tensor._from_op(total, None)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.schedule is not None:
            self.schedule.step()
        self.version += 1
        self.pending = {}
        self.step_started = None
        self.cond.notify_all()
        if self.checkpoint and self.checkpoint_every and self.version % self.checkpoint_every == 0:
            self.save(self.checkpoint)

    def _watch_stragglers(self):
        while not self.stopping:
            time.sleep(0.05)
            with self.cond:
                if self.mode != "sync" or self.step_started is None:
                    continue
                if time.monotonic() - self.step_started < self.sync_timeout:
                    continue
                late = sorted(self.active - set(self.pending))
                for wid in late:
                    self.active.discard(wid)
                log.warning("shard %d: dropped worker(s) %s from version %d: no push within %g s",
                            self.shard, late, self.version, self.sync_timeout)
                self._step(list(self.pending.values()))

    # --- pulls ---

    def wait_for(self, worker_id, min_version, is_active, encode=None):
        """Block until this worker may read parameters of version >= min_version; return a snapshot.

        encode(version, arrays) -> what to return, run under the lock: serializing there is the one copy.
        """
        with self.cond:
            while True:
                ready = self.version >= min_version and (self.started or self.mode == "async")
                if ready and self.mode == "bounded" and worker_id in self.clocks and self.active:
                    slowest = min(self.clocks.get(w, 0) for w in self.active)
                    ready = self.clocks[worker_id] - slowest <= self.staleness
                if worker_id not in self.active:
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"worker {worker_id} is not taking part (register again to rejoin)")
                if ready:
                    if encode is not None:
                        return encode(self.version, {n: p.data for n, p in self.params.items()})
                    return self.version, {n: p.data.copy() for n, p in self.params.items()}
                if not is_active() or self.stopping:
                    raise _Refused(grpc.StatusCode.CANCELLED, "the pull was cancelled")
                self.cond.wait(0.5)

    # --- checkpoints ---

    def save(self, path):
        """Parameters, optimizer state and version, atomically (safetensors + JSON metadata)."""
        arrays = {f"param/{n}": p.data for n, p in self.params.items()}
        index = {id(p): n for n, p in self.params.items()}
        scalars = {}
        for p, entries in self.optimizer.state.items():
            name = index[id(p)]
            for key, value in entries.items():
                if isinstance(value, np.ndarray):
                    arrays[f"optim/{name}/{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        meta = {"version": self.version, "mode": self.mode, "shard": self.shard, "scalars": scalars,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "signature": self.signature}
        save_safetensors(path, arrays, {"distbp-ps": json.dumps(meta)})
        log.info("shard %d: checkpoint of version %d written to %s", self.shard, self.version, path)

    def restore(self, path):
        arrays, metadata = load_safetensors(path)
        try:
            meta = json.loads(metadata["distbp-ps"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a distbp parameter-server checkpoint") from None
        if meta.get("signature") != self.signature or meta.get("shard") != self.shard:
            raise CheckpointError(f"{path}: checkpoint of another model or shard")
        for name, p in self.params.items():
            value = arrays.get(f"param/{name}")
            if value is None or value.shape != p.data.shape:
                raise CheckpointError(f"{path}: parameter {name!r} is missing or has another shape")
            p.data[...] = value
        self.optimizer.state = {}
        for name, p in self.params.items():
            entries = {k.split("/", 2)[2]: v.astype(p.data.dtype) for k, v in arrays.items()
                       if k.startswith(f"optim/{name}/")}
            entries.update(meta["scalars"].get(name, {}))
            if entries:
                self.optimizer.state[p] = entries
        if meta.get("schedule") and self.schedule is not None:
            self.schedule.load_state_dict(meta["schedule"])
        self.version = int(meta["version"])
        self.started = False  # wait for the workers to come back
        log.info("shard %d: restored version %d from %s", self.shard, self.version, path)

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


class _Refused(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Servicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, shard):
        self.shard = shard

    def Register(self, request, context):
        try:
            wid = self.shard.register(request.requested_id, request.signature)
        except _Refused as e:
            context.abort(e.code, e.message)
        s = self.shard
        return ps_pb2.RegisterReply(worker_id=wid, num_workers=s.expected, version=s.version, mode=s.mode,
                                    shard=s.shard, num_shards=s.num_shards)

    def Push(self, request_iterator, context):
        """Serialized PushRequests (see wire.py: decoded by hand, the tensor bytes read in place)."""
        first = None

        def chunks():
            nonlocal first
            for data in request_iterator:
                try:
                    head, chunk = decode_message(data, _PUSH_INTS, 3)
                except WireError as e:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad push: {e}") from None
                if first is None:
                    first = head
                elif head != first:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad push: worker id or version changes mid-stream")
                yield chunk

        try:
            gen = chunks()
            head = next(gen, None)
            if head is None:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad push: no tensors")
            version = self.shard.push(first["worker_id"], first["version"], _prepend(head, gen))
        except _Refused as e:
            context.abort(e.code, e.message)
        return ps_pb2.PushReply(version=version)

    def Pull(self, request, context):
        """Serialized PullReplies, encoded by hand (see wire.py)."""
        def encode(version, arrays):
            return [m for name, array in arrays.items() for m in encode_chunks(name, array, [(1, version)], 2)]

        try:
            messages = self.shard.wait_for(request.worker_id, request.min_version, context.is_active, encode)
        except _Refused as e:
            context.abort(e.code, e.message)
        yield from messages

    def Status(self, request, context):
        s = self.shard
        with s.cond:
            return ps_pb2.StatusReply(version=s.version, mode=s.mode, workers=sorted(s.active), pushes=s.pushes,
                                      shard=s.shard, num_shards=s.num_shards, parameters=list(s.params))


_PUSH_INTS = {1: "worker_id", 2: "version"}


def _identity(data):
    return data


def _add_servicer(servicer, server):
    """The generated registration, except that Push and Pull see and make serialized bytes."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register, request_deserializer=ps_pb2.RegisterRequest.FromString,
            response_serializer=ps_pb2.RegisterReply.SerializeToString),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=_identity, response_serializer=ps_pb2.PushReply.SerializeToString),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=ps_pb2.PullRequest.FromString, response_serializer=_identity),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=ps_pb2.StatusRequest.FromString,
            response_serializer=ps_pb2.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("distbp.ps.v1.ParameterServer", handlers),))


def _prepend(head, rest):
    yield head
    yield from rest


class _TokenCheck(grpc.ServerInterceptor):
    """Every call to the parameter-server service must carry `authorization: Bearer <token>`."""

    def __init__(self, token):
        self.expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream_in = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream_out = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if not details.method.startswith("/distbp.ps.v1.ParameterServer/"):
            return continuation(details)  # health checks and reflection stay open
        if dict(details.invocation_metadata).get("authorization") == self.expected:
            return continuation(details)
        if details.method.endswith("/Push"):
            return self._deny_stream_in
        if details.method.endswith("/Pull"):
            return self._deny_stream_out
        return self._deny_unary


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
    address = f"{host}:{port}"
    try:
        bound = _bind(server, address, tls)
    except RuntimeError:  # grpc's way of saying the port is taken
        raise OSError(f"cannot listen on {address}: the address is in use or not this machine's") from None
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
