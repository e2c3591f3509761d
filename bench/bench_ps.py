#!/usr/bin/env python
"""Throughput of distbp's parameter server against a raw gRPC bytes echo of the same size, on 127.0.0.1.

Payload: 2,097,152 float32 values = 8 MiB (MB below means 2**20 bytes), in two tensors
w0 (1536, 1024) and w1 (512, 1024). The shard is built directly, not through build_shard:
Shard({"w0": Parameter, "w1": Parameter}, SGD(lr=1e-6), mode="async", workers=1, signature=...).

Servers (each in its own process, started with multiprocessing "spawn", so no GIL is shared with the
client; both on 127.0.0.1 with a free port chosen by the OS, both with distbp.ps.server.GRPC_OPTIONS):

  distbp  distbp.ps.server.serve(shard), exactly as `distbp ps serve` runs it (health + reflection too)
  raw     a minimal grpc.server with a generic handler (grpc.method_handlers_generic_handler), bytes in
          and bytes out (no serializer at all), thread pool of 16 like serve()'s default; message limits
          distbp.ps.server.GRPC_OPTIONS (16 MB) on both sides, so one 8 MB message passes

Timed, per iteration (16 MB moved: 8 MB each way):

  distbp push+pull   PSClient (registered once) .push_pull(grads, out=params), as a training worker
  (1 call)           steps: one PushPull call streams TensorChunks of CHUNK_BYTES, the shard checks
                     them and takes one SGD step on them where they arrived, then streams the new
                     parameters back into the client's parameter arrays
  distbp push, pull  (for reference, no target) the same as two calls: .push(grads), .pull(out=params)
  (2 calls)
  raw echo           the target's reference: one unary call, the 8 MB sent as one prebuilt bytes message
                     and returned as it is (the handler returns its request)
  raw stream echo    (for reference, no target) one stream-stream call: 4 messages of CHUNK_BYTES sent,
                     each echoed back as it arrives (the handler returns the request iterator)
  raw push+pull      (for reference, no target) distbp's call pattern with raw bytes: a stream-unary call
                     sends the 4 messages (the server keeps them), a unary-stream call sends them back

Target: throughput(distbp push+pull) / throughput(raw echo) >= 0.70.

Why the unary echo is the reference: it is a raw gRPC bytes echo of the same size, and, like a push and
pull, it answers once the whole request has arrived. The stream echo returns its first 2 MB while the rest
is still arriving, so its two directions overlap; a parameter server cannot do that, since the new
parameters depend on the whole gradient, and a bad push must leave them untouched. The stream echo's ratio
is printed too (distbp measured against it until 2026-11-30: 0.58-0.69).

Threads: one BLAS thread in each server process (threadpoolctl, after scipy's BLAS is loaded), as
launch/ps_cluster.sh runs `distbp ps serve` (OMP_NUM_THREADS=1); --blas-threads 0 keeps the library's
default, whose idle threads spin after every SGD axpy and, on 2 cores, take CPU from the client.

Heap: both server processes and the client set glibc's malloc to keep freed blocks of up to 32 MB
(distbp.train.launch.keep_freed_memory(), as `distbp ps serve` and `distbp train` set it). Under the
default settings the echo server, which keeps nothing between messages, got fresh zeroed pages for about
half of its messages' bytes, or for none of them, depending on the heap's history: its time, and so the
ratio, moved by a third from run to run.

Method: one correctness check before any timing (the pulled parameters are the initial ones, and after
one push exactly init - lr * grad; the echo returns the bytes it got); warm-up; each measurement's loop
length is calibrated to ~target seconds; the repeats are interleaved (A B C A B C ...) and the median time
per iteration is reported, with the CPU time and the page faults of the client process and of the server
process per iteration (from /proc), to show where the work is.

    python bench/bench_ps.py                 # full run (~50-60 s on 2 cores)
    python bench/bench_ps.py --quick         # smoke test (a few seconds, mostly process start-up)
    python bench/bench_ps.py --json out.json # also write the results

Every server process is ended when the script ends, also on an error or SIGTERM/SIGINT; a server that
outlives the script anyway (the script killed with SIGKILL) sees its control pipe close and exits.
"""

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time
from concurrent import futures

import grpc
import numpy as np
from distbp.train.launch import keep_freed_memory

from machine import cpu_model, usable_cores

N_VALUES = 2_097_152
SHAPES = {"w0": (1536, 1024), "w1": (512, 1024)}  # 1,572,864 + 524,288 float32 values
assert sum(math.prod(s) for s in SHAPES.values()) == N_VALUES
PAYLOAD = N_VALUES * 4  # bytes each way
MB = 2 ** 20
LR = 1e-6
SEED = 0
TARGET_RATIO = 0.70
ECHO_SERVICE = "bench.Echo"


def initial_arrays():
    rng = np.random.default_rng(SEED)
    return {n: rng.standard_normal(s, dtype=np.float32) for n, s in SHAPES.items()}


def gradient_arrays():
    rng = np.random.default_rng(SEED + 1)
    return {n: rng.standard_normal(s, dtype=np.float32) for n, s in SHAPES.items()}


def named_parameters(arrays):
    from distbp.nn import Parameter

    return [(n, Parameter(a.copy())) for n, a in arrays.items()]


# ================================================================================================
# Server processes. Each gets one end of a pipe: it sends its port (or an error) on it, then blocks on
# it and stops when the parent says "stop" or when the pipe closes (the parent is gone, however).
# ================================================================================================


def _server_process(conn, kind, blas_threads):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C goes to the parent, which ends us through the pipe
    code = 0
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        import distbp.optim  # noqa: F401 -- loads scipy's BLAS (SGD's axpy): limits apply to loaded libraries only

        keep_freed_memory()
        if blas_threads:
            threadpool_limits(blas_threads)  # as deployed: launch/ps_cluster.sh runs `ps serve` with OMP_NUM_THREADS=1
        pools = sorted({p["num_threads"] for p in threadpool_info()})
        if kind == "distbp":
            server, port, shard = _start_distbp()
        else:
            server, port, shard = _start_echo()
        conn.send(("port", port, pools))
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        if shard is not None:
            shard.stop()
        server.stop(grace=0).wait(2.0)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails loudly
        code = 1
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", os.getpid()))
        except OSError:
            pass
    finally:
        os._exit(code)  # gRPC's threads must not keep the process alive


def _start_distbp():
    from distbp.optim import SGD
    from distbp.ps.client import model_signature
    from distbp.ps.server import Shard, serve

    named = named_parameters(initial_arrays())
    params = dict(named)
    shard = Shard(params, SGD(list(params.values()), lr=LR), mode="async", workers=1,
                  signature=model_signature(named))
    server, port = serve(shard, "127.0.0.1", 0)
    return server, port, shard


def _start_echo():
    from distbp.ps.server import GRPC_OPTIONS

    kept = []

    def echo(request, context):
        return request

    def stream_echo(request_iterator, context):
        return request_iterator  # each message goes back as soon as it arrives

    def push(request_iterator, context):
        kept[:] = list(request_iterator)
        return b""

    def pull(request, context):
        yield from kept

    handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo),
        "Push": grpc.stream_unary_rpc_method_handler(push),
        "Pull": grpc.unary_stream_rpc_method_handler(pull),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler], options=GRPC_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise OSError("cannot listen on 127.0.0.1")
    server.start()
    return server, port, None


class ServerProcess:
    def __init__(self, kind, blas_threads=1, timeout=120.0):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_process, args=(child, kind, blas_threads), daemon=True, name=f"bench-ps-{kind}")
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        try:
            if not self.conn.poll(timeout):
                raise RuntimeError(f"{kind} server: no port within {timeout:g} s")
            try:
                what, value, self.pools = self.conn.recv()
            except EOFError:
                self.proc.join(2)
                raise RuntimeError(f"{kind} server exited before it listened "
                                   f"(exit code {self.proc.exitcode})") from None
            if what != "port":
                raise RuntimeError(f"{kind} server failed: {value}")
        except BaseException:
            self.close()
            raise
        self.port = value
        self.address = f"127.0.0.1:{value}"

    def close(self):
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.conn.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)


def cpu_and_faults(pid=None):
    """(user + system CPU seconds, minor page faults) of a process (this one by default), or (None, None)
    without /proc. Page faults show an allocator handing out fresh pages for every message: a cost that
    depends on the heap's state, not on the code measured."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])
    except (OSError, ValueError, IndexError):
        return None, None


# ================================================================================================
# Clients. Each returns a zero-argument `iteration()` moving 8 MB each way.
# ================================================================================================


class DistbpClient:
    def __init__(self, address):
        from distbp.ps.client import PSClient

        self.init = initial_arrays()
        self.grads = gradient_arrays()
        named = named_parameters(self.init)
        self.params = {n: p.data for n, p in named}
        self.client = PSClient([address], named, retry_seconds=5.0)
        self.client.register()

    def check(self):
        lines, ok = [], True
        first = self.client.pull()
        d0 = max(float(np.max(np.abs(first[n] - self.init[n]))) for n in SHAPES)
        self.client.push(self.grads)
        after = self.client.pull()
        want = {n: self.init[n] - np.float32(LR) * self.grads[n] for n in SHAPES}
        d1 = max(float(np.max(np.abs(after[n] - want[n]))) for n in SHAPES)
        shapes_ok = all(after[n].shape == SHAPES[n] and after[n].dtype == np.float32 for n in SHAPES)
        good = d0 == 0.0 and d1 <= 1e-6 and shapes_ok and self.client.versions == [1]
        ok = ok and good
        lines.append(f"  distbp: pull == init (max|d|={d0:.1e}); after 1 push, pull == init - lr*grad "
                     f"(max|d|={d1:.1e}), version {self.client.versions[0]}  {'ok' if good else 'MISMATCH'}")
        # and the timed call itself: one PushPull, received into the model's arrays
        for n in SHAPES:
            self.params[n][...] = 0
        self.iteration()
        want = {n: self.init[n] - 2 * np.float32(LR) * self.grads[n] for n in SHAPES}
        d2 = max(float(np.max(np.abs(self.params[n] - want[n]))) for n in SHAPES)
        good = d2 <= 2e-6 and self.client.versions == [2]
        ok = ok and good
        lines.append(f"  distbp: one push_pull(out=params) leaves params == init - 2 lr*grad (max|d|={d2:.1e}), "
                     f"version {self.client.versions[0]}  {'ok' if good else 'MISMATCH'}")
        return ok, lines

    def iteration(self):
        # as a training worker steps: one PushPull call, the parameters received into the model's arrays
        return self.client.push_pull(self.grads, out=self.params)

    def two_calls(self):
        self.client.push(self.grads)
        return self.client.pull(out=self.params)

    def close(self):
        self.client.close()


class RawClient:
    def __init__(self, address):
        from distbp.ps.server import GRPC_OPTIONS
        from distbp.ps.wire import CHUNK_BYTES

        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        # no serializers: bytes in, bytes out
        self.echo_call = self.channel.unary_unary(f"/{ECHO_SERVICE}/Echo")
        self.stream_echo_call = self.channel.stream_stream(f"/{ECHO_SERVICE}/StreamEcho")
        self.push_call = self.channel.stream_unary(f"/{ECHO_SERVICE}/Push")
        self.pull_call = self.channel.unary_stream(f"/{ECHO_SERVICE}/Pull")
        blob = np.concatenate([a.reshape(-1) for a in gradient_arrays().values()]).tobytes()
        self.chunks = [blob[i:i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)]
        self.blob = blob

    def check(self):
        back = self.echo_call(self.blob)
        streamed = b"".join(self.stream_echo_call(iter(self.chunks)))
        self.push_call(iter(self.chunks))
        pulled = b"".join(self.pull_call(b""))
        good = back == self.blob and streamed == self.blob and pulled == self.blob
        return good, [(f"  raw   : the echo returns the {len(self.blob):,} bytes sent in one message, the stream "
                       f"echo and push+pull those sent in {len(self.chunks)}  {'ok' if good else 'MISMATCH'}")]

    def echo(self):
        n = len(self.echo_call(self.blob))
        if n != PAYLOAD:
            raise RuntimeError(f"raw echo returned {n} bytes, not {PAYLOAD}")

    def stream_echo(self):
        n = 0
        for message in self.stream_echo_call(iter(self.chunks)):
            n += len(message)
        if n != PAYLOAD:
            raise RuntimeError(f"raw stream echo returned {n} bytes, not {PAYLOAD}")

    def push_pull(self):
        self.push_call(iter(self.chunks))
        n = 0
        for message in self.pull_call(b""):
            n += len(message)
        if n != PAYLOAD:
            raise RuntimeError(f"raw pull returned {n} bytes, not {PAYLOAD}")

    def close(self):
        self.channel.close()


# ================================================================================================
# Timing (bench_core's method, plus the CPU time of both processes)
# ================================================================================================


class Measure:
    """One timed quantity: `run(n)` returns (wall seconds, {"client", "server": (cpu seconds, page faults)})
    for n iterations."""

    def __init__(self, label, fn, server_pid):
        self.label = label
        self.fn = fn
        self.server_pid = server_pid
        self.n = 1
        self.samples = []  # wall seconds per iteration, one per repeat
        self.per_iteration = {(side, what): [] for side in ("client", "server") for what in ("cpu", "faults")}

    def run(self, n):
        fn, clock = self.fn, time.perf_counter
        before = {"client": cpu_and_faults(), "server": cpu_and_faults(self.server_pid)}
        t0 = clock()
        for _ in range(n):
            fn()
        t = clock() - t0
        after = {"client": cpu_and_faults(), "server": cpu_and_faults(self.server_pid)}
        used = {side: tuple(None if a is None or b is None else a - b for a, b in zip(after[side], before[side]))
                for side in after}
        return t, used

    def calibrate(self, target):
        t = self.run(1)[0]
        n = 1
        while t < target / 8 and n < 100_000:
            n *= 4
            t = self.run(n)[0]
        self.n = max(1, math.ceil(n * target / max(t, 1e-9)))

    def sample(self):
        t, used = self.run(self.n)
        self.samples.append(t / self.n)
        for side, (cpu, faults) in used.items():
            for what, value in (("cpu", cpu), ("faults", faults)):
                if value is not None:
                    self.per_iteration[side, what].append(value / self.n)

    def median_ms(self):
        return 1e3 * statistics.median(self.samples)

    def mb_per_s(self):
        return 2 * PAYLOAD / MB / statistics.median(self.samples)

    def cpu_ms(self, side):
        values = self.per_iteration[side, "cpu"]
        return 1e3 * statistics.median(values) if values else float("nan")

    def faults(self, side):
        values = self.per_iteration[side, "faults"]
        return statistics.median(values) if values else float("nan")


def time_interleaved(measures, target, repeats, warmup):
    for m in measures:
        for _ in range(warmup):
            m.run(1)
    for m in measures:
        m.calibrate(target)
    for _ in range(repeats):
        for m in measures:  # A B C A B C ...: machine noise hits all alike
            m.sample()


# ================================================================================================
# Machine description
# ================================================================================================


def machine_info():
    import google.protobuf
    from google.protobuf.internal import api_implementation

    cpu = cpu_model()
    usable = usable_cores()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "protobuf_impl": api_implementation.Type(),
        "platform": platform.platform(),
        "distbp_commit": _git_state(),
    }


def _git_state():
    """The checkout's commit and whether distbp/ has local changes (the code measured), or None."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "distbp"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' + local changes in distbp/' if dirty else ''}" if head else None


def print_machine(info):
    print(f"CPU      : {info['cpu']}  ({info['cores']} cores, {info['usable_cores']} usable)")
    print(f"Python   : {info['python']}   numpy {info['numpy']}   grpcio {info['grpcio']}   "
          f"protobuf {info['protobuf']} ({info['protobuf_impl']})   {info['platform']}")
    if info["distbp_commit"]:
        print(f"distbp   : commit {info['distbp_commit']}")


# ================================================================================================
# Main
# ================================================================================================

LABELS = {
    "distbp": "distbp push+pull (1 call)",
    "distbp_2calls": "distbp push, pull (2 calls)",
    "raw_echo": "raw echo (unary, 8 MB)",
    "raw_stream_echo": "raw stream echo (4 msgs)",
    "raw_push_pull": "raw push+pull (2 calls)",
}


def print_table(res):
    w = 27
    print()
    print("=" * 110)
    print(f"per iteration: {PAYLOAD / MB:g} MB pushed + {PAYLOAD / MB:g} MB pulled; MB = 2**20 bytes; "
          f"MB/s = {2 * PAYLOAD / MB:g} MB / median time")
    print(f"{'':{w}s} {'ms (median)':>11s} {'min..max over repeats':>22s} {'MB/s':>7s} "
          f"{'cpu ms: client':>15s} {'server':>7s} {'faults: client':>15s} {'server':>7s}")
    print("-" * 110)
    for k, v in res["ms"].items():
        s = res["samples_ms"][k]
        print(f"{LABELS[k]:{w}s} {v:11.2f} {min(s):10.2f} .. {max(s):<8.2f} {res['mb_per_s'][k]:7.0f} "
              f"{res['cpu_ms']['client'][k]:15.2f} {res['cpu_ms']['server'][k]:7.2f} "
              f"{res['page_faults']['client'][k]:15.0f} {res['page_faults']['server'][k]:7.0f}   "
              f"(x{res['iters_per_sample'][k]})")
    print("-" * 110)
    c = res["check"]
    print(f"{'distbp / raw echo (MB/s)':{w}s} {c['value']:11.3f}   (paired {res['ratio_paired_median']:.3f})   "
          f"target >= {c['target']:.2f}   {'PASS' if c['pass'] else 'MISS'}")
    print(f"{'distbp / raw stream echo':{w}s} {res['ratio_vs_raw_stream_echo']:11.3f}   (no target: its two "
          "directions overlap)")
    print(f"{'distbp / raw push+pull':{w}s} {res['ratio_vs_raw_push_pull']:11.3f}   (no target)")
    print(f"{'distbp 2 calls / raw echo':{w}s} {res['ratio_two_calls']:11.3f}   (no target)")
    print("=" * 110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke test, not a measurement")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 9)")
    ap.add_argument("--target-seconds", type=float, default=None, help="seconds per measurement (default 1.0)")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads in the server processes (default 1, as launch/ps_cluster.sh runs them; "
                         "0: the library's default)")
    args = ap.parse_args()
    target = args.target_seconds or (0.05 if args.quick else 1.0)
    repeats = args.repeats or (2 if args.quick else 9)
    warmup = 1 if args.quick else 5

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # run the finally below: end the servers

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    t_start = time.perf_counter()
    heap = keep_freed_memory()
    info = machine_info()
    info["heap"] = heap
    print_machine(info)
    from distbp.ps.wire import CHUNK_BYTES

    print(f"mode     : {'quick' if args.quick else 'full'}: {repeats} interleaved repeats of ~{target:g} s each, "
          f"median reported; {N_VALUES:,} float32 = {PAYLOAD / MB:g} MB each way in "
          f"{math.ceil(PAYLOAD / CHUNK_BYTES)} chunks of {CHUNK_BYTES / MB:g} MB")
    print(f"distbp   : Shard built directly: {', '.join(f'{n}{s}' for n, s in SHAPES.items())}, SGD lr={LR:g}, "
          f"async, 1 worker; serve() in a spawned process; PSClient in this one")
    print(f"heap     : {heap or 'the C library default'}, in both servers and this client")
    servers, clients = [], []
    try:
        ps = ServerProcess("distbp", args.blas_threads)
        servers.append(ps)
        echo = ServerProcess("raw", args.blas_threads)
        servers.append(echo)
        d = DistbpClient(ps.address)
        clients.append(d)
        r = RawClient(echo.address)
        clients.append(r)
        print(f"servers  : distbp pid {ps.pid} on {ps.address}, raw pid {echo.pid} on {echo.address}; "
              f"BLAS threads in them {ps.pools} and {echo.pools} (--blas-threads {args.blas_threads})")
        print("correctness (before timing):")
        ok_d, lines_d = d.check()
        ok_r, lines_r = r.check()
        print("\n".join(lines_d + lines_r))
        if not (ok_d and ok_r):
            print("correctness check failed: no timing", file=sys.stderr)
            return 1
        measures = {
            "distbp": Measure(LABELS["distbp"], d.iteration, ps.pid),
            "distbp_2calls": Measure(LABELS["distbp_2calls"], d.two_calls, ps.pid),
            "raw_echo": Measure(LABELS["raw_echo"], r.echo, echo.pid),
            "raw_stream_echo": Measure(LABELS["raw_stream_echo"], r.stream_echo, echo.pid),
            "raw_push_pull": Measure(LABELS["raw_push_pull"], r.push_pull, echo.pid),
        }
        time_interleaved(list(measures.values()), target, repeats, warmup)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):  # the servers must still be ended
                c.close()
        for s in servers:
            s.close()
    survivors = [s.pid for s in servers if s.proc.is_alive()]
    if survivors:
        print(f"server processes still alive: {survivors}", file=sys.stderr)
        return 1

    ms = {k: m.median_ms() for k, m in measures.items()}
    ratio = ms["raw_echo"] / ms["distbp"]  # throughput ratio = inverse time ratio
    paired = statistics.median(b / a for a, b in zip(measures["distbp"].samples, measures["raw_echo"].samples))
    res = {
        "ms": ms,
        "mb_per_s": {k: m.mb_per_s() for k, m in measures.items()},
        "samples_ms": {k: [1e3 * s for s in m.samples] for k, m in measures.items()},
        "iters_per_sample": {k: m.n for k, m in measures.items()},
        "cpu_ms": {w: {k: m.cpu_ms(w) for k, m in measures.items()} for w in ("client", "server")},
        "page_faults": {w: {k: m.faults(w) for k, m in measures.items()} for w in ("client", "server")},
        "ratio_paired_median": paired,
        "ratio_vs_raw_stream_echo": ms["raw_stream_echo"] / ms["distbp"],
        "ratio_vs_raw_push_pull": ms["raw_push_pull"] / ms["distbp"],
        "ratio_two_calls": ms["raw_echo"] / ms["distbp_2calls"],
        "check": {"name": "distbp_over_raw_echo_throughput", "value": ratio, "target": TARGET_RATIO,
                  "pass": ratio >= TARGET_RATIO},
    }
    print_table(res)
    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.1f} s")
    if args.json:
        out = {"machine": info, "mode": "quick" if args.quick else "full", "repeats": repeats,
               "server_blas_threads": args.blas_threads,
               "target_seconds": target, "payload_bytes_each_way": PAYLOAD, "chunk_bytes": CHUNK_BYTES,
               "shapes": SHAPES, "elapsed_s": elapsed, "results": res}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
