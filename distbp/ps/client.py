"""The worker's side: talk to every shard at once, push gradients, pull parameters, retry while a
server is unavailable."""

import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import grpc
import numpy as np

from .server import GRPC_OPTIONS
from .v1 import ps_pb2, ps_pb2_grpc
from .wire import Assembler, assign_shards, decode_message, encode_chunks

log = logging.getLogger("distbp.ps")
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CLOSE_SECONDS = 5.0  # the longest a stopping worker waits for its channels to close (see _stop)
RETRY_REPORT_SECONDS = 10.0  # while a shard stays away, a line this often (the retries themselves log at debug)


def _identity(data):
    return data


class PSError(RuntimeError):
    """A parameter-server call failed for good (refused, or the server stayed away too long)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


def model_signature(named_params):
    return json.dumps([[n, list(p.data.shape), str(p.data.dtype)] for n, p in named_params])


def parse_addresses(text):
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"parameter-server address {a!r} is not HOST:PORT")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):  # gRPC would read another port
            raise ValueError(f"parameter-server address {a!r}: write an IPv6 address in brackets, "
                             f"[{host}]:{port}")
    if not addresses:
        raise ValueError("no parameter-server address given (--ps HOST:PORT[,HOST:PORT...])")
    return addresses


class PSClient:
    """Connections to every shard (one per address, in shard order)."""

    def __init__(self, addresses, named_params, token=None, tls_ca=None, retry_seconds=60.0, tls_cert=None,
                 tls_key=None, settings=None):
        self.addresses = list(addresses)
        self.settings = json.dumps(settings) if settings else ""  # checked against the servers' at register
        self.params = dict(named_params)
        self.signature = model_signature(named_params)
        self.owner = assign_shards({n: p.data.size for n, p in self.params.items()}, len(self.addresses))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.retry_seconds = retry_seconds
        self.tls = bool(tls_ca or tls_cert)
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self.channels = [grpc.secure_channel(a, creds, options=GRPC_OPTIONS) for a in self.addresses]
        else:
            self.channels = [grpc.insecure_channel(a, options=GRPC_OPTIONS) for a in self.addresses]
        self.stubs = [ps_pb2_grpc.ParameterServerStub(c) for c in self.channels]
        # Push and Pull carry the bulk: their messages are encoded and decoded by hand (wire.py)
        self._push = [c.stream_unary("/distbp.ps.v1.ParameterServer/Push", request_serializer=_identity,
                                     response_deserializer=ps_pb2.PushReply.FromString) for c in self.channels]
        self._pull = [c.unary_stream("/distbp.ps.v1.ParameterServer/Pull",
                                     request_serializer=ps_pb2.PullRequest.SerializeToString,
                                     response_deserializer=_identity) for c in self.channels]
        self._push_pull = [c.stream_stream("/distbp.ps.v1.ParameterServer/PushPull", request_serializer=_identity,
                                           response_deserializer=_identity) for c in self.channels]
        self.pool = ThreadPoolExecutor(max_workers=max(len(self.stubs) - 1, 1), thread_name_prefix="distbp-ps-client")
        self.stopping = threading.Event()  # set when the process is being stopped: no retries
        self.worker_id = -1
        self.registrations = [0] * len(self.stubs)  # each shard's token for this registration
        self.versions = [0] * len(self.stubs)
        # this registration's pushes that went through: the next is numbered one more, the same for every
        # shard and every retry of it, so a shard applies it once (a refused push leaves its number free);
        # its step in the worker's run is steps + that number, so a shard that has the step skips it
        self.pushes = 0
        self.steps = 0

    def _call(self, what, shard, fn):
        """fn() with retries and backoff while the shard is unavailable."""
        start = time.monotonic()
        deadline = start + self.retry_seconds
        delay = 0.1
        said = None  # when the wait was last reported: once at first, then every RETRY_REPORT_SECONDS
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                now = time.monotonic()
                where = f"shard {shard} at {self.addresses[shard]}"
                if code in _RETRY and now < deadline and not self.stopping.is_set():
                    if said is None:
                        log.warning("%s: %s is unavailable (%s): no server answers there yet, or it is restarting%s; "
                                    "retrying for up to %g s", what, where, code.name,
                                    "" if self.tls else " (or it serves TLS, and this worker was given no --ps-tls-ca)",
                                    self.retry_seconds)
                        said = now
                    elif now - said >= RETRY_REPORT_SECONDS:
                        log.warning("%s: %s still unavailable after %.0f s; retrying", what, where, now - start)
                        said = now
                    log.debug("%s: %s unavailable; retrying in %.1f s", what, where, delay)
                    self.stopping.wait(delay)  # a stop ends the wait
                    delay = min(delay * 2, 2.0)
                    continue
                waited = f" (unavailable for {now - start:.0f} s)" if said is not None else ""
                raise PSError(f"{what} on {where}{waited}: {code.name}: {e.details()}", code) from None

    def _each(self, fn):
        """[fn(shard) for every shard], concurrently; shard 0 runs in this thread (no hand-off for one server)."""
        others = []
        try:
            # started inside the try: a signal can arrive while the pool starts a thread, whose call may already
            # be retrying (it once ended the worker's main thread and left that call retrying until its deadline)
            for shard in range(1, len(self.stubs)):
                others.append(self.pool.submit(fn, shard))
            first = fn(0)
            wait(others)
        except Exception:
            try:
                wait(others)  # no call is left running behind an error
            except BaseException:  # Ctrl-C or SIGTERM while the others retry
                self._stop()
                raise
            raise
        except BaseException:  # Ctrl-C or SIGTERM: end the other calls (retries too) at once
            self._stop()
            raise
        return [first] + [f.result() for f in others]

    def _stop(self):
        """Cancel every call in flight and every retry: the process is ending. (The calls' own errors, a
        cancellation or a closed channel, stay in their futures.) A second signal waits until it is done,
        or it could leave a call running that the process would wait for at exit."""
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        blocking = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        if blocking:
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            self.stopping.set()
            # Closing a channel cancels its calls at once, then waits for gRPC's bookkeeping of them to end. A
            # signal that strikes inside gRPC's own start of a call can leave that wait unending (a worker hung
            # at exit), so each close runs in a thread of its own, waited for CLOSE_SECONDS at most.
            closing = [threading.Thread(target=c.close, daemon=True, name="distbp-ps-close") for c in self.channels]
            for thread in closing:
                thread.start()
            deadline = time.monotonic() + CLOSE_SECONDS
            for thread in closing:
                thread.join(max(deadline - time.monotonic(), 0.0))
        finally:
            if blocking:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def register(self, requested_id=-1, name="worker"):
        # the addresses are checked first: a worker refused after registering would hold a worker id
        statuses = self.status()
        for s, status in enumerate(statuses):
            if status.num_shards != len(self.stubs) or status.shard != s:
                raise PSError(f"the server at {self.addresses[s]} is shard {status.shard} of {status.num_shards}, "
                              f"but it is address {s} of {len(self.stubs)} given")
            if status.mode != statuses[0].mode:
                raise PSError(f"the shards disagree: {self.addresses[0]} runs in {statuses[0].mode} mode, "
                              f"{self.addresses[s]} in {status.mode} mode")

        def request(wid):
            return ps_pb2.RegisterRequest(worker_name=name, requested_id=wid, signature=self.signature,
                                          settings=self.settings)

        first = self._call("register", 0, lambda: self.stubs[0].Register(request(requested_id), metadata=self.metadata))
        self.worker_id = first.worker_id
        self.pushes = 0
        replies = [first] + [self._call("register", s, lambda s=s: self.stubs[s].Register(
            request(first.worker_id), metadata=self.metadata)) for s in range(1, len(self.stubs))]
        for s, reply in enumerate(replies):
            if reply.num_workers != first.num_workers:
                raise PSError(f"the shards disagree: {self.addresses[0]} expects {first.num_workers} workers, "
                              f"{self.addresses[s]} {reply.num_workers}")
        self.registrations = [r.registration for r in replies]
        self.versions = [r.version for r in replies]
        # every shard applies every push: a shard restored from an older checkpoint than the others has the
        # fewest, and the worker goes on from there (shards a step apart are usual: one has stepped first)
        steps = [r.steps for r in replies]
        self.steps = min(steps)
        if max(steps) - self.steps > 1:
            ahead = ("skip them" if first.mode != "sync" else
                     "apply them again (in sync mode a push is for a version, and the versions differ)")
            log.warning("worker %d: the shards count %s steps of its run: it goes on from step %d, and the "
                        "shards ahead (restored from a newer checkpoint, or not restarted) %s",
                        self.worker_id, steps, self.steps, ahead)
        return first

    def push(self, grads):
        """Push name -> gradient array to the shards that own them, all shards at once."""
        sequence = self.pushes + 1

        def one(shard):
            call = self._push[shard]
            return self._call("push", shard, lambda: call(self._requests(shard, grads, sequence),
                                                          metadata=self.metadata)).version

        versions = self._each(one)
        self.pushes = sequence
        return versions

    def pull(self, min_versions=None, out=None):
        """name -> parameter array from every shard, each at least at its min version.

        out: optional name -> array to receive the parameter in place (a model's own parameter arrays:
        one copy from the wire, none after); the others arrive in new arrays.
        """

        def one(shard):
            request = ps_pb2.PullRequest(worker_id=self.worker_id,
                                         min_version=0 if min_versions is None else min_versions[shard])
            call = self._pull[shard]
            return self._call("pull", shard, lambda: self._receive(shard, call(request, metadata=self.metadata), out))

        return self._merge(self._each(one))

    def push_pull(self, grads, out=None):
        """push(grads), then the parameters it leads to, in one call per shard: in sync mode those of the
        next version (once every worker pushed), otherwise the current ones. Returns what pull returns."""
        sequence = self.pushes + 1

        def one(shard):
            call = self._push_pull[shard]
            return self._call("push+pull", shard, lambda: self._receive(
                shard, call(self._requests(shard, grads, sequence), metadata=self.metadata), out))

        merged = self._merge(self._each(one))
        self.pushes = sequence
        return merged

    def _requests(self, shard, grads, sequence):
        """Serialized PushRequests for the gradients of the parameters `shard` holds: push number `sequence`
        (the same in a retry)."""
        ints = [(1, self.worker_id), (2, self.versions[shard]), (4, sequence), (5, self.registrations[shard]),
                (6, self.steps + sequence)]
        for name, owner in self.owner.items():
            if owner == shard:
                yield from encode_chunks(name, grads[name], ints, 3)

    def _receive(self, shard, replies, out):
        """(version, name -> array) from the serialized PullReplies of `shard`, into `out`'s arrays if given."""
        expected = {n: (self.params[n].data.shape, self.params[n].data.dtype)
                    for n, owner in self.owner.items() if owner == shard}
        assembler = Assembler(expected, {n: out[n] for n in expected if n in out} if out else None)
        version = None
        for data in replies:
            head, chunk = decode_message(data, {1: "version"}, 2)
            version = head["version"]
            assembler.add(chunk)
        return version, assembler.result()

    def _merge(self, results):
        self.versions = [v for v, _ in results]
        merged = {}
        for _, arrays in results:
            merged.update(arrays)
        return merged

    def status(self):
        return self._each(lambda s: self._call("status", s, lambda: self.stubs[s].Status(
            ps_pb2.StatusRequest(), metadata=self.metadata)))

    def close(self):
        self.pool.shutdown(wait=False)
        for c in self.channels:
            c.close()


class PSStep:
    """The training loop's step for a parameter server: push local gradients, pull new parameters.

    Registration happens here, before the trainer is built, because the worker id picks the data shard.
    """

    backend = "ps"
    shards_evaluation = False  # each worker evaluates on the whole test split

    rank, world_size = 0, 1
    loss_scale = 1.0  # the servers average the workers' gradients
    start_step = 0  # the training step the servers are at when this worker joins

    def __init__(self, addresses, token=None, tls_ca=None, retry_seconds=60.0, requested_id=-1, tls_cert=None,
                 tls_key=None, settings=None):
        self.options = dict(token=token, tls_ca=tls_ca, retry_seconds=retry_seconds, tls_cert=tls_cert,
                            tls_key=tls_key, settings=settings)
        self.addresses, self.requested_id = addresses, requested_id
        self.client = None

    def bind(self, model):
        """Register with the servers as a worker of this model (the trainer calls this first)."""
        self.client = PSClient(self.addresses, list(model.named_parameters()), **self.options)
        reply = self.client.register(self.requested_id)
        self.rank, self.world_size, self.mode = reply.worker_id, reply.num_workers, reply.mode
        # a worker that (re)starts after the servers have taken steps (restored from their checkpoints, or with
        # the others running) continues where its id's run is: sync, the version; else the pushes it made
        self.start_step = self.client.steps

    def prepare(self, model, optimizer, tracer=None):
        self._pull_into(model)

    def reduce_gradients(self, model):
        pass

    def apply(self, model, optimizer):
        grads = {n: p.grad.data if p.grad is not None else np.zeros_like(p.data) for n, p in model.named_parameters()}
        try:
            # one call per shard: the push, then (sync) the next version once every worker pushed, or
            # (async, bounded) the latest, straight into the model's arrays
            self._pull_into(model, push=grads)
        except PSError as e:
            if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # dropped from a step, or a server restarted from its checkpoint: rejoin with the current
            # parameters (this step's gradient is stale and is not applied), and go on from the step the
            # servers have this worker at, as a worker that starts does. Counting the refused step as done
            # would leave the worker one step ahead of the servers' count for good (a finished worker
            # would still pace the others); after a restore it would skip the steps the servers lost.
            log.warning("worker %d rejoins: %s", self.rank, e)
            self.client.register(requested_id=self.rank)
            self._pull_into(model)
            return self.client.steps
        return None

    def _pull_into(self, model, push=None):
        """The servers' parameters (after pushing the gradients `push`, if given), written straight into
        the model's own arrays."""
        named = list(model.named_parameters())
        direct = {n: p.data for n, p in named if p.data.flags.c_contiguous}
        arrays = self.client.pull(out=direct) if push is None else self.client.push_pull(push, out=direct)
        for name, p in named:
            if name not in direct:
                p.data[...] = arrays[name]
            p._bump_version()  # changed in place, as by an optimizer step

    def all_sum(self, values):
        return list(values)

    def gather(self, obj):
        return [obj]

    def close(self):
        if self.client is not None:
            self.client.close()
