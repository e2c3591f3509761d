#!/usr/bin/env python
"""Data-parallel training over MPI: distbp's DataParallel on 2 and 1 ranks against PyTorch DDP (gloo).

One BLAS thread per process (threadpoolctl.threadpool_limits(1), torch.set_num_threads(1), and
OMP/OPENBLAS/MKL_NUM_THREADS=1 in every child). Network: MLP 784-1024-1024-10 (1,863,690 float32
parameters = 7.1 MiB of gradient), batch 256 per rank, plain SGD lr 0.01, fixed-seed random float32 data
(rank r draws its batch from seed SEED + r). A training step is zero_grad, forward, cross_entropy,
backward, gradient synchronisation, optimizer step.

Jobs, each a set of processes that this script starts (and ends):

  distbp-2   mpiexec -n 2: distbp.comm.mpi_communicator() + distbp.parallel.DataParallel (default 25 MB
             buckets) + distbp.optim.SGD, as distbp's trainer runs them: backward from loss / world size
             and DataParallel(average=False), so the all-reduce's sum is the mean with no pass to
             divide. Besides training steps (and each step's phases) it times the gradient
             synchronisation alone on a fixed gradient: the DataParallel post-accumulate hooks fed by
             hand, exactly as the autograd engine fires them (every gradient already written by its op
             into its slice of the flat bucket; each bucket's all-reduce launched when it is full) +
             ddp.synchronize(), against one raw mpi4py COMM_WORLD.Allreduce(MPI.IN_PLACE, buf) of a
             contiguous float32 buffer of the same 1,863,690 values (plus diagnostics). The buckets are
             all-reduced in memory the ranks share (distbp's default when they run on one machine);
             with DISTBP_MPI_SHM=0 in the environment, by MPI's own Iallreduce instead.
  distbp-1   mpiexec -n 1, the same code: for the scaling efficiency.
  torch-2    2 processes of torch.nn.parallel.DistributedDataParallel over gloo (init_method
             tcp://127.0.0.1:<free port>), same network, initial weights, data and optimizer.
  nosync-2   mpiexec -n 2, the same training steps with no gradient synchronisation at all: what two ranks
             computing side by side allow on this machine (the ceiling of the scaling efficiency).

Targets: sync / raw all-reduce <= 1.10; scaling efficiency tput(distbp-2) / (2 tput(distbp-1)) >= 0.90;
tput(distbp-2) / tput(torch-2) >= 1.0.

Method. All jobs start at once; each sets up, checks its numbers (distbp-2: the synchronised first-step
gradient is the average of the ranks' local gradients, the hand-fed synchronisation averages too; distbp-2
and torch-2 agree on the first loss and averaged-gradient norm; the ranks' weights are identical at the
end), warms up, and then waits on a control socket, blocked (not spinning in MPI), while the other jobs
run. This script then runs `rounds` rounds; in each, every job in turn (rotating order) runs one sample:
a barrier, one untimed step, then `steps` timed steps, timed as the slowest rank's wall time. Interleaving
samples a few tenths of a second long, instead of restarting jobs, lets the slow phases of a noisy
machine hit every job alike. The CPU time that other processes (and the hypervisor's steal) take during
each sample is read from /proc; a round with a sample during which they used more than FOREIGN_LIMIT
cores is dropped and retaken (within a time budget; if too few rounds are clean, all are used and the
report says so). Reported: the median over rounds of each job's samples and the ratios of those medians,
with two cross-checks: the median of the ratios taken round by round (paired) and the ratio of the lower
quartiles (q1). The sync measures are interleaved within each sample the same way.

    python bench/bench_mpi.py                  # full run (~2 min on 2 cores; at most ~3 on a busy machine)
    python bench/bench_mpi.py --quick          # smoke test (~20 s, mostly process start-up)
    python bench/bench_mpi.py --json out.json  # also write the results (every sample)

BENCH_MPI_INJECT_FAILURE=distbp|torch makes rank 1 of those jobs raise (to check the failure path).

Exit status 0 when every job ran and every correctness check held (missed targets are reported, not
fatal); 1 when a process failed or hung (the command, its exit status and the tail of its output are
printed, and every process this script started is ended) or a correctness check failed.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from distbp.comm import find_mpiexec
from machine import cpu_model, usable_cores

SIZES = (784, 1024, 1024, 10)
BATCH = 256
LR = 0.01
SEED = 0
N_PARAMS = sum(SIZES[i] * SIZES[i + 1] + SIZES[i + 1] for i in range(len(SIZES) - 1))  # 1,863,690
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MPIEXEC = find_mpiexec()

TARGETS = {
    "sync_over_raw": ("<=", 1.10),
    "scaling_efficiency": (">=", 0.90),
    "distbp_over_torch": (">=", 1.0),
}

# steps: timed steps per training sample; warmup: steps at set-up; sync_iters: calls per sync sample;
# rounds: interleaved rounds (one training sample of every job, one sync sample of the distbp jobs each)
# budget_s: seconds of sampling after which the run settles for the rounds it has (see FOREIGN_LIMIT)
MODES = {
    "full": dict(steps=8, warmup=3, sync_iters=30, rounds=45, budget_s=140.0),
    "quick": dict(steps=2, warmup=1, sync_iters=4, rounds=2, budget_s=10.0),
}
# A sample during which processes not started by this script (or the hypervisor: steal) used more than
# this many cores on average is disturbed; a round with a disturbed training sample is retaken.
FOREIGN_LIMIT = 0.15
START_TIMEOUT = 180.0  # seconds for every job to start, set up and check itself
COMMAND_TIMEOUT = 120.0  # seconds for one sample


# ================================================================================================
# Shared pieces
# ================================================================================================


def make_data(rank):
    rng = np.random.default_rng(SEED + rank)
    x = rng.standard_normal((BATCH, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], BATCH).astype(np.int64)
    return x, y


def build_distbp_mlp():
    import distbp
    import distbp.nn as dnn

    distbp.manual_seed(SEED)
    layers = []
    for i in range(len(SIZES) - 1):
        layers.append(dnn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(dnn.ReLU())
    return dnn.Sequential(*layers)


def limit_threads():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def pools_summary():
    from threadpoolctl import threadpool_info

    return [{k: p.get(k) for k in ("user_api", "internal_api", "version", "threading_layer", "architecture",
                                    "num_threads", "filepath")} for p in threadpool_info()]


def _maybe_fail(kind, rank):
    if os.environ.get("BENCH_MPI_INJECT_FAILURE") == kind and rank == 1:
        raise RuntimeError(f"injected failure in {kind} rank 1 (BENCH_MPI_INJECT_FAILURE)")


class Control:
    """A worker's line-delimited JSON connection to the orchestrator; blocking reads cost no CPU."""

    def __init__(self, port, job, rank):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rwb")
        self.job, self.rank = job, rank

    def send(self, obj):
        self.file.write((json.dumps(obj) + "\n").encode())
        self.file.flush()

    def recv(self):
        line = self.file.readline()
        if not line:
            raise SystemExit(f"{self.job} rank {self.rank}: the orchestrator went away")
        return json.loads(line)


def serve(job, ctl, rank):
    """Answer the orchestrator's commands until 'finish'. Rank 0 answers with data, the others with an ack."""
    ctl.send({"job": ctl.job, "rank": rank, "ready": job.ready_info() if rank == 0 else None})
    while True:
        msg = ctl.recv()
        cmd = msg["cmd"]
        if cmd == "train":
            out = job.train_sample()
        elif cmd == "sync":
            out = job.sync_sample()
        elif cmd == "finish":
            out = job.finish()
        else:
            raise ValueError(f"unknown command {cmd!r}")
        ctl.send(out if rank == 0 else {"ack": True})
        if cmd == "finish":
            return


# ================================================================================================
# Worker: distbp on MPI ranks (started by mpiexec)
# ================================================================================================


def worker_distbp(args):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        _limits = limit_threads()  # noqa: F841  (kept for the whole job)
        job = DistbpJob(args, world, MPI)
        serve(job, Control(args.control, args.job, world.Get_rank()), world.Get_rank())
        return 0
    except BaseException:
        sys.stderr.write(f"[{args.job} rank {world.Get_rank()} of {world.Get_size()}] failed:\n"
                         f"{traceback.format_exc()}")
        sys.stderr.flush()
        world.Abort(1)  # ends the other ranks too, rather than leaving them in a collective
        return 1


class DistbpJob:
    def __init__(self, args, world, MPI):
        import distbp
        import distbp.nn.functional as DF
        from distbp.optim import SGD

        self.MPI, self.world, self.mode = MPI, world, MODES[args.mode]
        self.DF = DF
        self.clock = time.perf_counter
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.sync = not args.no_sync
        self.loss_scale = 1.0 / self.size if self.sync else 1.0
        _maybe_fail("distbp", self.rank)
        self.model = build_distbp_mlp()
        self.params = [p for _, p in self.model.named_parameters()]
        assert sum(p.data.size for p in self.params) == N_PARAMS
        x, y = make_data(self.rank)
        self.x, self.y = distbp.Tensor(x), distbp.Tensor(y)
        self.first = {}
        if self.sync:
            from distbp.comm import mpi_communicator
            from distbp.parallel import DataParallel

            self.comm = mpi_communicator()
            # as distbp's trainer (AllReduceStep) runs it: backward from loss / world size, gradients summed
            self.ddp = DataParallel(self.model, self.comm, average=False)
            self.opt = SGD(self.model.parameters(), lr=LR)
            self._check_first_step()
            self._setup_sync()
        else:
            self.ddp = None
            self.opt = SGD(self.model.parameters(), lr=LR)
        self.train(self.mode["warmup"], [0.0] * 4)

    def slowest(self, seconds):  # a data-parallel step lasts as long as its slowest rank's
        return self.world.allreduce(seconds, op=self.MPI.MAX)

    def _check_first_step(self):
        """The synchronised first-step gradient must be the average of every rank's local gradient."""
        import distbp

        DF = self.DF
        ref = build_distbp_mlp()
        avg = [np.zeros(p.data.shape, np.float64) for p in ref.parameters()]
        for r in range(self.size):
            xr, yr = make_data(r)
            for p in ref.parameters():
                p.grad = None
            DF.cross_entropy(ref(distbp.Tensor(xr)), distbp.Tensor(yr)).backward()
            for a, p in zip(avg, ref.parameters()):
                a += p.grad.data / self.size
        self.opt.zero_grad(set_to_none=True)
        loss = DF.cross_entropy(self.ddp(self.x), self.y)
        (loss * self.loss_scale).backward()
        # the premise of the sync measure below: backward wrote every gradient into its bucket slice
        written = all(p.grad.data is p._grad_dest for p in self.params)
        self.ddp.synchronize()
        err = max(float(np.max(np.abs(p.grad.data - a))) / (float(np.max(np.abs(a))) + 1e-30)
                  for p, a in zip(self.params, avg))
        norm = float(np.sqrt(sum(float(np.sum(p.grad.data.astype(np.float64) ** 2)) for p in self.params)))
        self.first = {"loss_rank0": float(loss.item()), "grad_norm": norm, "grad_rel_err_vs_local_average": err,
                      "grads_written_into_buckets": written}
        self.opt.step()

    def train(self, n, acc):
        DF, opt, ddp, model, x, y, clock = self.DF, self.opt, self.ddp, self.model, self.x, self.y, self.clock
        scale = self.loss_scale
        for _ in range(n):
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            loss = DF.cross_entropy(model(x), y)
            t1 = clock()
            (loss * scale if scale != 1.0 else loss).backward()
            t2 = clock()
            if ddp is not None:
                ddp.synchronize()
            t3 = clock()
            opt.step()
            t4 = clock()
            acc[0] += t1 - t0
            acc[1] += t2 - t1
            acc[2] += t3 - t2
            acc[3] += t4 - t3

    def train_sample(self):
        n = self.mode["steps"]
        self.train(1, [0.0] * 4)  # caches and pages back after idling
        self.world.Barrier()
        acc = [0.0] * 4
        t0 = self.clock()
        self.train(n, acc)
        step = self.slowest(self.clock() - t0) / n
        return {"step_s": step, "phases_s": [a / n for a in acc]}  # phases: this rank's (rank 0's)

    # --- gradient synchronisation alone ---

    def _setup_sync(self):
        import distbp

        MPI, world, comm, ddp, params = self.MPI, self.world, self.comm, self.ddp, self.params
        rng = np.random.default_rng(1000 + self.rank)
        # each rank's gradient as backward from loss * loss_scale leaves it: already divided by the size,
        # and (Linear's weight and bias gradients) written by their ops straight into the bucket slices
        # that DataParallel made their gradient destinations
        scale = np.float32(self.loss_scale)
        fixed = [rng.standard_normal(p.data.shape, dtype=np.float32) * scale for p in params]
        dests = [p._grad_dest for p in params]
        order = list(reversed(range(len(params))))  # the order backward finishes them
        clock = self.clock
        self.split = split = [0.0, 0.0]  # seconds in the hooks, in synchronize()
        Tensor = distbp.Tensor

        def sync():
            # what the autograd engine does for DataParallel during backward once an op has written a
            # gradient into its destination: set .grad to a Tensor over it, fire the post-accumulate hook
            # (DataParallel._grad_ready: the bucket's all-reduce launched once it is full); then what the
            # training step does: ddp.synchronize()
            t0 = clock()
            for i in order:
                p = params[i]
                p.grad = Tensor._from_op(dests[i], None)
                ddp._grad_ready(p)
            t1 = clock()
            ddp.synchronize()
            split[0] += t1 - t0
            split[1] += clock() - t1

        # check it once: every rank must end with the average of every rank's fixed gradient
        for d, f in zip(dests, fixed):
            d[...] = f
        sync()
        expect = [np.zeros(p.data.shape, np.float64) for p in params]
        for r in range(self.size):
            rr = np.random.default_rng(1000 + r)
            for e, p in zip(expect, params):
                e += rr.standard_normal(p.data.shape, dtype=np.float32) / self.size
        err = max(float(np.max(np.abs(p.grad.data - e))) for p, e in zip(params, expect))
        self.first["sync_check_max_abs_err"] = err
        self.opt.zero_grad(set_to_none=True)
        for d in dests:  # zeros stay zeros, however often they are summed
            d[...] = 0

        buf = np.zeros(N_PARAMS, np.float32)  # zeros stay zeros, however often they are summed
        buf2 = np.zeros(N_PARAMS, np.float32)
        src = np.ones(N_PARAMS, np.float32)
        half = np.float32(0.5)
        self.measures = {
            "sync": sync,
            "raw_allreduce": lambda: world.Allreduce(MPI.IN_PLACE, buf),
            "raw_iallreduce_wait": lambda: world.Iallreduce(MPI.IN_PLACE, buf).Wait(),
            "comm_iallreduce_wait": lambda: comm.iallreduce(buf2, "sum").wait(),
            "local_copy": lambda: np.copyto(buf2, src),
            "local_scale": lambda: np.multiply(buf2, half, out=buf2),
        }

    def sync_sample(self):
        iters = self.mode["sync_iters"]
        out = {}
        for name, fn in self.measures.items():  # interleaved within the sample too
            fn()
            fn()
            self.split[:] = [0.0, 0.0]
            self.world.Barrier()
            t0 = self.clock()
            for _ in range(iters):
                fn()
            out[name] = self.slowest(self.clock() - t0) / iters
            if name == "sync":
                split = [s / iters for s in self.split]
        self.opt.zero_grad(set_to_none=True)
        return {"sync_s": out, "sync_split_s": split}

    def ready_info(self):
        from mpi4py import MPI

        info = {"ranks": self.size, "threadpools": pools_summary(),
                "mpi_library": MPI.Get_library_version().strip().splitlines()[0]}
        if self.sync:
            info.update(first_step=self.first,
                        shared_memory=all(self.ddp.comm.is_shared(b.buffer) for b in self.ddp.buckets),
                        buckets=[{"params": len(b.params), "values": int(sum(p.data.size for _, p in b.params)), "MiB": b.nbytes / 2**20}
                                 for b in self.ddp.buckets])
        return info

    def finish(self):
        if not self.sync:
            return {"same_weights": None}
        digest = hashlib.sha256(np.concatenate([p.data.reshape(-1) for p in self.params]).tobytes()).hexdigest()
        return {"same_weights": len(set(self.world.allgather(digest))) == 1,
                "allreduce_calls": self.ddp.allreduce_calls}


# ================================================================================================
# Worker: one PyTorch DDP process (gloo)
# ================================================================================================


def worker_torch(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    _limits = limit_threads()  # noqa: F841
    from datetime import timedelta

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world, timeout=timedelta(seconds=COMMAND_TIMEOUT))
        job = TorchJob(args, torch, dist)
        serve(job, Control(args.control, args.job, args.rank), args.rank)
        dist.destroy_process_group()
        return 0
    except BaseException:
        sys.stderr.write(f"[{args.job} process {args.rank} of {args.world}] failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)  # at once: the orchestrator ends the peer


class TorchJob:
    def __init__(self, args, torch, dist):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.torch, self.dist, self.mode = torch, dist, MODES[args.mode]
        self.clock = time.perf_counter
        self.rank, self.size = args.rank, args.world
        _maybe_fail("torch", self.rank)
        dmodel = build_distbp_mlp()  # the same initial weights as distbp
        mods = []
        for m in dmodel:
            if hasattr(m, "weight"):
                t = torch.nn.Linear(m.in_features, m.out_features)
                with torch.no_grad():
                    t.weight.copy_(torch.from_numpy(m.weight.data))
                    t.bias.copy_(torch.from_numpy(m.bias.data))
                mods.append(t)
            else:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        self.ddp = DDP(self.model)  # bucket_cap_mb=25 by default
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.x, self.y = (torch.from_numpy(a) for a in make_data(self.rank))
        self.F = torch.nn.functional

        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.ddp(self.x), self.y)
        loss.backward()
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.model.parameters())))
        self.first = {"loss_rank0": float(loss.item()), "grad_norm": norm}
        self.opt.step()
        self.train(self.mode["warmup"], [0.0] * 3)
        self.buf = torch.zeros(N_PARAMS, dtype=torch.float32)

    def slowest(self, seconds):
        t = self.torch.tensor([seconds], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def train(self, n, acc):
        opt, ddp, F, x, y, clock = self.opt, self.ddp, self.F, self.x, self.y, self.clock
        for _ in range(n):
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(x), y)
            t1 = clock()
            loss.backward()  # DDP all-reduces the gradient buckets during backward
            t2 = clock()
            opt.step()
            t3 = clock()
            acc[0] += t1 - t0
            acc[1] += t2 - t1
            acc[2] += t3 - t2

    def train_sample(self):
        n = self.mode["steps"]
        self.train(1, [0.0] * 3)
        self.dist.barrier()
        acc = [0.0] * 3
        t0 = self.clock()
        self.train(n, acc)
        step = self.slowest(self.clock() - t0) / n
        return {"step_s": step, "phases_s": [a / n for a in acc]}

    def sync_sample(self):  # gloo's own all-reduce of the same number of values, for reference
        iters = self.mode["sync_iters"]
        self.dist.all_reduce(self.buf)
        self.dist.barrier()
        t0 = self.clock()
        for _ in range(iters):
            self.dist.all_reduce(self.buf)
        return {"sync_s": {"gloo_allreduce": self.slowest(self.clock() - t0) / iters}}

    def ready_info(self):
        return {"ranks": self.size, "first_step": self.first, "torch_threads": self.torch.get_num_threads(),
                "threadpools": pools_summary()}

    def finish(self):
        flat = self.torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        other = flat.clone()
        self.dist.broadcast(other, src=0)
        return {"same_weights": bool(self.torch.equal(flat, other))}


# ================================================================================================
# Orchestrator: starts the jobs, drives them, makes sure none outlives it, reports failures
# ================================================================================================


class JobFailed(RuntimeError):
    pass


JOBS = {  # name -> (kind, processes)
    "distbp-2": ("distbp", 2),
    "distbp-1": ("distbp", 1),
    "torch-2": ("torch", 2),
    "nosync-2": ("nosync", 2),
}
PHASES = {
    "distbp": ("zero_grad+forward+loss", "backward (+hooks)", "synchronize()", "opt.step()"),
    "nosync": ("zero_grad+forward+loss", "backward", "-", "opt.step()"),
    "torch": ("zero_grad+forward+loss", "backward (+all-reduce)", "opt.step()"),
}


def _kill(proc):
    """End a child we started and everything it started (mpiexec's proxies and ranks), each by its pid."""
    family = _descendants(proc.pid, _proc_table())  # found before the parent dies and they are re-parented
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the child leads its own session and process group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    for pid in [proc.pid, *family]:  # whatever is left (hydra puts ranks in sessions of their own)
        if pid == proc.pid and proc.poll() is not None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass


class Job:
    def __init__(self, name, mode, control_port, workdir):
        self.name = name
        self.kind, self.nprocs = JOBS[name]
        self.workdir = workdir
        self.procs = []  # (command, Popen, log path)
        self.conns = {}  # rank -> (socket, its file)
        self.ready = None
        script = os.path.abspath(__file__)
        common = ["--mode", mode, "--control", str(control_port), "--job", name]
        if self.kind in ("distbp", "nosync"):
            cmd = [MPIEXEC, "-n", str(self.nprocs), sys.executable, script, "--worker", "distbp", *common]
            if self.kind == "nosync":
                cmd.append("--no-sync")
            cmds = [cmd]
        else:
            port = free_port()
            cmds = [[sys.executable, script, "--worker", "torch", *common, "--rank", str(r),
                     "--world", str(self.nprocs), "--port", str(port)] for r in range(self.nprocs)]
        env = {**os.environ, **THREAD_ENV}
        for i, cmd in enumerate(cmds):
            path = os.path.join(workdir, f"{name}.{i}.log")
            with open(path, "w") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            self.procs.append((cmd, proc, path))

    def exited_badly(self):
        for cmd, proc, _ in self.procs:
            code = proc.poll()
            if code is not None and (code != 0 or len(self.conns) < self.nprocs):
                return cmd, code
        return None

    def fail(self, why):
        time.sleep(0.5)  # let a dying process finish writing and exit
        lines = [f"{self.name}: {why}"]
        for cmd, proc, path in self.procs:
            code = proc.poll()
            status = "still running (killed)" if code is None else f"exit status {code}"
            lines.append(f"  `{' '.join(cmd)}`\n  -> {status}; last output:\n{_tail(path)}")
        self.kill()
        raise JobFailed("\n".join(lines))

    def command(self, cmd, timeout=COMMAND_TIMEOUT):
        msg = (json.dumps({"cmd": cmd}) + "\n").encode()
        try:
            for sock, f in self.conns.values():
                sock.settimeout(timeout)
                f.write(msg)
                f.flush()
            replies = {}
            for rank, (_, f) in self.conns.items():
                line = f.readline()
                if not line:
                    self.fail(f"rank {rank} closed the connection during '{cmd}'")
                replies[rank] = json.loads(line)
        except (socket.timeout, TimeoutError):
            self.fail(f"no answer to '{cmd}' within {timeout:g} s")
        except OSError as e:
            self.fail(f"lost the connection during '{cmd}' ({e})")
        return replies[0]

    def kill(self):
        for sock, f in self.conns.values():
            for c in (f, sock):
                try:
                    c.close()
                except OSError:
                    pass
        self.conns = {}
        for _, proc, _ in self.procs:
            _kill(proc)


def _tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            text = f.read().rstrip().splitlines()
    except OSError:
        return "    | (no output)"
    return "\n".join("    | " + s for s in text[-lines:]) or "    | (no output)"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table():
    """{pid: (ppid, utime + stime in clock ticks)} of every process, from /proc (empty where there is none)."""
    table = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return table
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
            table[int(pid)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(root, table):
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


class LoadMeter:
    """CPU time used on this machine by anything but this script and the processes it started.

    Busy time comes from /proc/stat (plus steal: the hypervisor giving our cores to someone else); ours
    is the CPU time in /proc/PID/stat of this process and all its descendants (mpiexec's proxies and
    ranks put themselves in new sessions, but they stay our descendants).
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self):
        self.ok = os.path.exists("/proc/stat")

    def snap(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
        steal = v[7] if len(v) > 7 else 0
        table = _proc_table()
        me = os.getpid()
        ours = sum(table[p][1] for p in [me, *_descendants(me, table)] if p in table)
        return time.monotonic(), busy, steal, ours

    def foreign(self, a, b):
        """Average number of cores used by others between two snaps."""
        if a is None or b is None or b[0] <= a[0]:
            return 0.0
        others = (b[1] - a[1]) - (b[3] - a[3]) + (b[2] - a[2])
        return max(0.0, others / self.HZ / (b[0] - a[0]))

    def wait_quiet(self, limit, patience):
        """Wait until others use less than `limit` cores over 0.3 s, for at most `patience` seconds."""
        end = time.monotonic() + patience
        while True:
            a = self.snap()
            time.sleep(0.3)
            load = self.foreign(a, self.snap())
            if load <= limit or time.monotonic() > end:
                return load


def start_jobs(mode, workdir):
    """Start every job; return them once each process has set up, checked itself and connected."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    jobs = {}
    try:
        for name in JOBS:
            jobs[name] = Job(name, mode, port, workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while any(len(j.conns) < j.nprocs for j in jobs.values()):
            for j in jobs.values():
                bad = j.exited_badly()
                if bad:
                    j.fail(f"a process exited with status {bad[1]} before it was ready")
            if time.monotonic() > deadline:
                late = [j for j in jobs.values() if len(j.conns) < j.nprocs][0]
                late.fail(f"not ready within {START_TIMEOUT:g} s")
            try:
                conn, _ = server.accept()
            except (socket.timeout, TimeoutError):
                continue
            conn.settimeout(COMMAND_TIMEOUT)
            f = conn.makefile("rwb")
            hello = json.loads(f.readline())
            job = jobs[hello["job"]]
            job.conns[hello["rank"]] = (conn, f)
            if hello["rank"] == 0:
                job.ready = hello["ready"]
        for j in jobs.values():
            j.conns = dict(sorted(j.conns.items()))
        return jobs
    except BaseException:
        for j in jobs.values():
            j.kill()
        raise
    finally:
        server.close()


def run(mode, cfg, workdir):
    jobs = start_jobs(mode, workdir)
    try:
        names = list(JOBS)
        meter = LoadMeter()
        rounds = []  # every round taken: {"train": {job: sample}, "sync": {job: sample}, "clean": bool}
        wanted, start, attempt = cfg["rounds"], time.monotonic(), 0
        while sum(r["clean"] for r in rounds) < wanted:
            if rounds and time.monotonic() - start > cfg["budget_s"]:
                print(f"  sampling budget of {cfg['budget_s']:g} s used up", flush=True)
                break
            if rounds and not rounds[-1]["clean"]:
                meter.wait_quiet(FOREIGN_LIMIT / 2, patience=5.0)
            order = names[attempt % len(names):] + names[: attempt % len(names)]
            attempt += 1
            rnd = {"train": {}, "sync": {}}
            for n in order:  # rotating order: A B C D, B C D A, ...
                a = meter.snap()
                rnd["train"][n] = res = jobs[n].command("train")
                res["foreign_cores"] = meter.foreign(a, meter.snap())
            for n in ("distbp-2", "distbp-1", "torch-2"):
                a = meter.snap()
                rnd["sync"][n] = res = jobs[n].command("sync")
                res["foreign_cores"] = meter.foreign(a, meter.snap())
            worst = max(r["foreign_cores"] for r in rnd["train"].values())
            rnd["clean"] = worst <= FOREIGN_LIMIT
            rounds.append(rnd)
            d2 = rnd["sync"]["distbp-2"]["sync_s"]
            print(f"  round {len(rounds):2d}  ms/step: "
                  + "  ".join(f"{n} {1e3 * rnd['train'][n]['step_s']:6.2f}" for n in names)
                  + f"   sync/raw {d2['sync'] / d2['raw_allreduce']:.2f}   others {worst:4.2f} cores"
                  + ("" if rnd["clean"] else "  -> disturbed, retaken"), flush=True)
        finals = {n: jobs[n].command("finish") for n in names}
        for j in jobs.values():  # every process should now exit by itself
            for _, proc, _ in j.procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    j.fail("did not exit after 'finish'")
            bad = j.exited_badly()
            if bad:
                j.fail(f"a process exited with status {bad[1]} after 'finish'")
        ready = {n: j.ready for n, j in jobs.items()}
        return rounds, finals, ready
    finally:
        for j in jobs.values():
            j.kill()


# ================================================================================================
# Machine description
# ================================================================================================


def machine_info():
    import mpi4py

    mpi4py.rc.initialize = False  # the orchestrator is no MPI process; MPI_Get_library_version needs no init
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    cpu = cpu_model()
    usable = usable_cores()
    try:
        torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                       capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        torch_version = "?"
    lib = MPI.Get_library_version().strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch_version,
        "mpi4py": mpi4py.__version__,
        "mpi_library": " ".join(lib.splitlines()[0].split()),
        "mpi_library_full": lib,
        "mpiexec": MPIEXEC,
        "threadpools": pools_summary(),
        "platform": platform.platform(),
    }


def print_machine(info):
    print(f"CPU      : {info['cpu']}  ({info['cores']} cores, {info['usable_cores']} usable)")
    print(f"Python   : {info['python']}   numpy {info['numpy']}   torch {info['torch']}   {info['platform']}")
    for p in info["threadpools"]:
        print(f"BLAS     : {p['internal_api']} {p['version'] or ''} {p['architecture'] or ''} "
              f"{os.path.basename(p['filepath'] or '')}  (1 thread in every rank)")
    print(f"MPI      : {info['mpi_library']}   mpi4py {info['mpi4py']}   {info['mpiexec']}")


# ================================================================================================
# Report
# ================================================================================================


def summarize(rounds, finals, ready, wanted):
    med = statistics.median
    kept = [r for r in rounds if r["clean"]]
    quiet = len(kept) >= min(wanted, max(3, wanted // 3))
    if not quiet:  # too busy a machine to be choosy: use everything, and say so
        kept = rounds
    samples = {n: [r["train"][n] for r in kept] for n in JOBS}
    sync = {n: [r["sync"][n] for r in kept] for n in ("distbp-2", "distbp-1", "torch-2")}
    jobs = {}
    for n, ss in samples.items():
        steps = [s["step_s"] for s in ss]
        kind, procs = JOBS[n]
        jobs[n] = {"step_ms": 1e3 * med(steps), "throughput": procs * BATCH / med(steps),
                   "min_ms": 1e3 * min(steps), "max_ms": 1e3 * max(steps),
                   "phases_ms_rank0": {k: 1e3 * med(s["phases_s"][i] for s in ss)
                                       for i, k in enumerate(PHASES[kind]) if k != "-"}}
    tput = {n: [procs * BATCH / s["step_s"] for s in samples[n]] for n, (_, procs) in JOBS.items()}
    sync_ms = {k: 1e3 * med(s["sync_s"][k] for s in sync["distbp-2"]) for k in sync["distbp-2"][0]["sync_s"]}
    sync_ms["gloo_allreduce"] = 1e3 * med(s["sync_s"]["gloo_allreduce"] for s in sync["torch-2"])
    sync_ms_1 = {k: 1e3 * med(s["sync_s"][k] for s in sync["distbp-1"]) for k in ("sync", "raw_allreduce")}
    split = [1e3 * med(s["sync_split_s"][i] for s in sync["distbp-2"]) for i in range(2)]
    ratios = {
        "sync_over_raw": sync_ms["sync"] / sync_ms["raw_allreduce"],
        "scaling_efficiency": jobs["distbp-2"]["throughput"] / (2 * jobs["distbp-1"]["throughput"]),
        "distbp_over_torch": jobs["distbp-2"]["throughput"] / jobs["torch-2"]["throughput"],
    }
    paired = {
        "sync_over_raw": med(s["sync_s"]["sync"] / s["sync_s"]["raw_allreduce"] for s in sync["distbp-2"]),
        "scaling_efficiency": med(a / (2 * b) for a, b in zip(tput["distbp-2"], tput["distbp-1"])),
        "distbp_over_torch": med(a / b for a, b in zip(tput["distbp-2"], tput["torch-2"])),
    }
    # and from the lower quartiles (on a machine whose noise only ever slows things down, the fast end of
    # the distribution is another fair estimate)
    def q1(values):
        return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) >= 2 else values[0]

    q1_step = {n: q1([s["step_s"] for s in samples[n]]) for n in JOBS}
    quartile = {
        "sync_over_raw": q1([s["sync_s"]["sync"] for s in sync["distbp-2"]])
        / q1([s["sync_s"]["raw_allreduce"] for s in sync["distbp-2"]]),
        "scaling_efficiency": q1_step["distbp-1"] / q1_step["distbp-2"],  # (2*B/t2) / (2 * B/t1)
        "distbp_over_torch": q1_step["torch-2"] / q1_step["distbp-2"],
    }
    ceiling = jobs["nosync-2"]["throughput"] / (2 * jobs["distbp-1"]["throughput"])
    ceiling_paired = med(a / (2 * b) for a, b in zip(tput["nosync-2"], tput["distbp-1"]))
    checks = {}
    for k, (cmp, target) in TARGETS.items():
        v = ratios[k]
        checks[k] = {"value": v, "paired": paired[k], "q1": quartile[k], "target": target, "cmp": cmp,
                     "pass": v <= target if cmp == "<=" else v >= target}
    fd, ft = ready["distbp-2"]["first_step"], ready["torch-2"]["first_step"]
    correctness = {
        "distbp-2: synchronised first-step gradient = mean of the ranks' local ones (max rel err)":
            (fd["grad_rel_err_vs_local_average"], 1e-5),
        "distbp-2: hand-fed hooks + synchronize() = mean of the ranks' gradients (max abs err)":
            (fd["sync_check_max_abs_err"], 1e-5),
        "distbp-2: gradients not written by backward into their bucket slices (the sync measure's premise)":
            (0 if fd["grads_written_into_buckets"] else 1, 0),
        "distbp-2 vs torch-2: first loss (abs diff)": (abs(fd["loss_rank0"] - ft["loss_rank0"]), 1e-4),
        "distbp-2 vs torch-2: first averaged-gradient norm (rel diff)":
            (abs(fd["grad_norm"] - ft["grad_norm"]) / ft["grad_norm"], 1e-4),
        "ranks with different weights at the end (distbp-2, distbp-1, torch-2)":
            (sum(finals[n]["same_weights"] is False for n in ("distbp-2", "distbp-1", "torch-2")), 0),
    }
    correctness = {k: {"value": v, "tol": tol, "ok": v <= tol} for k, (v, tol) in correctness.items()}
    threads = sorted({p["num_threads"] for r in ready.values() for p in r["threadpools"]}
                     | {ready["torch-2"]["torch_threads"]})
    return {"jobs": jobs, "sync_ms": sync_ms, "sync_ms_1rank": sync_ms_1, "sync_split_ms_rank0": split,
            "ratios": ratios, "ratios_paired": paired, "scaling_ceiling_no_sync": ceiling,
            "scaling_ceiling_no_sync_paired": ceiling_paired, "checks": checks, "correctness": correctness,
            "buckets": ready["distbp-2"]["buckets"], "shared_memory": ready["distbp-2"]["shared_memory"],
            "rank_threads": threads,
            "rounds_taken": len(rounds), "rounds_used": len(kept), "only_undisturbed": quiet,
            "foreign_cores_median_used": med(max(x["foreign_cores"] for x in r["train"].values()) for r in kept)}


def print_report(s, cfg):
    W = 96
    print()
    print("=" * W)
    buckets = ", ".join(f"{b['MiB']:.2f} MiB" for b in s["buckets"])
    where = "in shared memory" if s["shared_memory"] else "by MPI's Iallreduce"
    print(f"MLP {'-'.join(map(str, SIZES))}: {N_PARAMS:,} float32 params ({4 * N_PARAMS / 2**20:.2f} MiB; distbp "
          f"buckets: {buckets}, all-reduced {where}), batch {BATCH}/rank, SGD lr {LR}")
    print(f"1 BLAS thread per rank; median of {s['rounds_used']} interleaved samples per job "
          f"({cfg['steps']} steps each; sync: {cfg['sync_iters']} calls each)")
    if s["only_undisturbed"]:
        print(f"rounds: {s['rounds_used']} undisturbed used, {s['rounds_taken'] - s['rounds_used']} disturbed "
              f"(other processes > {FOREIGN_LIMIT} cores) dropped")
    else:
        print(f"WARNING: the machine was busy: too few of the {s['rounds_taken']} rounds were undisturbed, so all "
              f"are used (other processes' load, median over rounds: {s['foreign_cores_median_used']:.2f} "
              "cores). Treat the numbers with care.")
    print("-" * W)
    print(f"{'training step':48s} {'ms/step':>8s} {'samples/s':>10s}   {'min..max ms/step':>16s}")
    labels = {"distbp-2": "distbp  DataParallel, MPI, 2 ranks",
              "distbp-1": "distbp  DataParallel, MPI, 1 rank",
              "torch-2": "torch   DDP, gloo, 2 processes",
              "nosync-2": "distbp  2 ranks, no gradient sync (ceiling)"}
    for k, lab in labels.items():
        j = s["jobs"][k]
        print(f"  {lab:46s} {j['step_ms']:8.2f} {j['throughput']:10.0f}   {j['min_ms']:7.2f}..{j['max_ms']:<7.2f}")
    print("-" * W)
    print(f"{'gradient synchronisation alone, 2 ranks, ' + format(N_PARAMS, ',') + ' float32 values':70s} "
          f"{'ms/call':>8s}")
    sync_labels = {
        "sync": "distbp  hooks (bucket + launch) + ddp.synchronize()",
        "raw_allreduce": "mpi4py  COMM_WORLD.Allreduce(IN_PLACE, buf)   [raw]",
        "raw_iallreduce_wait": "mpi4py  COMM_WORLD.Iallreduce(IN_PLACE, buf).Wait()",
        "comm_iallreduce_wait": "distbp  comm.iallreduce(buf).wait()   (communicator alone)",
        "local_copy": "numpy   copy of the values   (no communication)",
        "local_scale": "numpy   values *= 0.5   (no communication)",
        "gloo_allreduce": "torch   dist.all_reduce(buf), gloo   (reference)",
    }
    for k, lab in sync_labels.items():
        print(f"  {lab:68s} {s['sync_ms'][k]:8.3f}")
    hooks, syn = s["sync_split_ms_rank0"]
    print(f"    distbp sync on rank 0 = hooks {hooks:.3f} + synchronize() {syn:.3f} (wait, .grad views)")
    print(f"    distbp-1 (no peer): sync {s['sync_ms_1rank']['sync']:.3f} ms vs raw allreduce "
          f"{s['sync_ms_1rank']['raw_allreduce']:.3f} ms: DataParallel's purely local cost")
    print("-" * W)
    print("phases per training step on rank 0 (ms, medians):")
    for job, j in s["jobs"].items():
        print(f"  {job:9s} " + "   ".join(f"{k} {v:.2f}" for k, v in j["phases_ms_rank0"].items()))
    print("-" * W)
    rl = {"sync_over_raw": "sync / raw all-reduce (time)",
          "scaling_efficiency": "scaling efficiency tput(2) / (2 tput(1))",
          "distbp_over_torch": "distbp-2 / torch-2 (throughput)"}
    head = "ratio (of the medians; cross-checks: paired, q1)"
    print(f"  {head:50s} {'value':>6s}  {'paired':>6s}  {'q1':>6s}   target")
    for k, c in s["checks"].items():
        print(f"  {rl[k]:50s} {c['value']:6.3f}  {c['paired']:6.3f}  {c['q1']:6.3f}   {c['cmp']} {c['target']:.2f}   "
              f"{'PASS' if c['pass'] else 'MISS'}")
    print(f"  {'(ceiling: tput(nosync-2) / (2 tput(1)))':50s} {s['scaling_ceiling_no_sync']:6.3f}  "
          f"{s['scaling_ceiling_no_sync_paired']:6.3f}          (two ranks side by side, no communication)")
    print("  paired: median of the per-round ratios; q1: ratio of the lower quartiles")
    print("-" * W)
    print("correctness:")
    for k, c in s["correctness"].items():
        print(f"  {k:86s} {c['value']:.1e}  {'ok' if c['ok'] else 'FAILED'}")
    print("=" * W)
    print(f"{sum(c['pass'] for c in s['checks'].values())}/{len(s['checks'])} targets met   "
          f"(BLAS/torch threads reported by the ranks: {s['rank_threads']})")


# ================================================================================================
# Main
# ================================================================================================


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    ap.add_argument("--json", metavar="PATH", help="write the results (and every sample) as JSON")
    ap.add_argument("--rounds", type=int, default=None,
                    help="undisturbed interleaved rounds wanted (default 45; quick 2)")
    # internal: the workers
    ap.add_argument("--worker", choices=("distbp", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=tuple(MODES), default="full", help=argparse.SUPPRESS)
    ap.add_argument("--control", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--no-sync", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "distbp":
        return worker_distbp(args)
    if args.worker == "torch":
        return worker_torch(args)

    if MPIEXEC is None:
        print("bench_mpi: no mpiexec beside this Python or on PATH (pip install mpi4py mpich)", file=sys.stderr)
        return 1
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.rounds:
        cfg["rounds"] = args.rounds
    t_start = time.perf_counter()
    with limit_threads():
        info = machine_info()
    print_machine(info)
    print(f"mode     : {mode}: jobs {', '.join(JOBS)} started once; {cfg['rounds']} undisturbed rounds wanted "
          f"(budget {cfg['budget_s']:g} s), each one sample of every job in rotating order; seed {SEED}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the clean-up below runs
    workdir = tempfile.mkdtemp(prefix="bench_mpi.")
    try:
        rounds, finals, ready = run(mode, cfg, workdir)
    except JobFailed as e:
        print(f"\nbench_mpi: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_mpi: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(rounds, finals, ready, cfg["rounds"])
    print_report(summary, cfg)
    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.1f} s")
    if args.json:
        out = {"machine": info, "mode": mode, "config": cfg, "elapsed_s": elapsed, "summary": summary,
               "ready": ready, "finals": finals, "rounds": rounds}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        print(f"wrote {args.json}")
    ok = all(c["ok"] for c in summary["correctness"].values())
    if not ok:
        print("bench_mpi: a correctness check FAILED (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
