"""DataParallel: every rank holds the whole model; gradients are averaged over ranks during backward.

Parameters are grouped into buckets of about `bucket_cap_mb`, in reverse registration order (roughly
the order in which backward finishes them); one of 1 MB or more is a bucket of its own, reduced in its
own `.grad` without a copy. When a parameter's gradient is final (the autograd
engine's post-accumulate hook) it is copied into its bucket's flat buffer; when a bucket is full its
all-reduce starts at once, while backward goes on with earlier layers. Buckets are launched strictly in
index order on every rank (a different order on different ranks would pair the wrong buffers or hang).
`synchronize()` waits for them all, averages, and leaves each parameter's `.grad` as a view of its
bucket.
"""

import contextlib
import time

import numpy as np

from ..autograd.tensor import Tensor
from ..comm.base import CommError


IN_PLACE_BYTES = 1024 * 1024  # a parameter this large is all-reduced alone, in its own .grad


class ModelMismatch(CommError):
    """Ranks hold different models (names, shapes or dtypes differ)."""


class UnusedParameters(RuntimeError):
    pass


class _Bucket:
    def __init__(self, index, params, dtype, in_place=False):
        self.index = index
        self.params = params  # (name, parameter) pairs
        # a large parameter alone: all-reduced in its own .grad, no copy into a flat buffer
        self.in_place = in_place
        self.array = None  # what was handed to the all-reduce
        self.offsets = {}
        offset = 0
        for name, p in params:
            self.offsets[id(p)] = (offset, p.data.size)
            offset += p.data.size
        self.buffer = None if in_place else np.zeros(offset, dtype)
        self.wire = None  # float16 copy when compressing
        self.ready = set()
        self.handle = None
        self.launched_at = self.finished_at = None

    @property
    def nbytes(self):
        return sum(p.data.nbytes for _, p in self.params)


class DataParallel:
    """Wrap `model` for data-parallel training over communicator `comm`.

    bucket_cap_mb: gradient bytes per all-reduce (default 25, as in PyTorch DDP).
    allow_unused: treat parameters that got no gradient in a step as zero instead of raising.
    compress: None, or "fp16" to exchange gradients as float16 (halves the bytes; less precise).
    tracer: optional object with span(name, start, end, lane) for timelines.
    average: True (as PyTorch DDP): after synchronize(), .grad is the mean over ranks, which costs a pass
        over every gradient to divide it by the world size. False: .grad is the sum over ranks, with no
        pass of its own -- the mean too, when every gradient comes from a loss already multiplied by
        1 / world_size before backward (what distbp's trainer does: one scalar multiply instead).
    """

    def __init__(self, model, comm, bucket_cap_mb=25.0, allow_unused=False, compress=None, tracer=None,
                 average=True):
        if compress not in (None, "fp16"):
            raise ValueError(f"DataParallel: compress must be None or 'fp16', not {compress!r}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"DataParallel: bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.module, self.comm = model, comm
        self.allow_unused, self.compress, self.tracer = allow_unused, compress, tracer
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._check_same_model()
        self._broadcast_state()
        self.buckets = self._make_buckets(bucket_cap_mb * 1024 * 1024)
        self._bucket_of = {id(p): b for b in self.buckets for _, p in b.params}
        self._next_launch = 0
        self._syncing = True
        self.average = average
        self._scale = 1.0 / comm.size if average else 1.0
        self.allreduce_calls = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for _, p in self.named]

    # --- start-up ---

    def _check_same_model(self):
        mine = [(n, tuple(p.data.shape), str(p.data.dtype)) for n, p in self.named]
        everyone = self.comm.allgather(mine)
        reference = everyone[0]
        for rank, theirs in enumerate(everyone[1:], 1):
            if theirs == reference:
                continue
            for i in range(max(len(reference), len(theirs))):
                a = reference[i] if i < len(reference) else None
                b = theirs[i] if i < len(theirs) else None
                if a != b:
                    raise ModelMismatch(
                        f"DataParallel: rank {rank} has a different model than rank 0: parameter #{i} is "
                        f"{_describe(b)} on rank {rank} but {_describe(a)} on rank 0"
                    )

    def _broadcast_state(self):
        for _, p in self.named:
            self.comm.broadcast(p.data, root=0)
        for _, b in self.module.named_buffers():
            arr = b.data if isinstance(b, Tensor) else b
            if isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.writeable:
                self.comm.broadcast(arr, root=0)

    def _make_buckets(self, cap_bytes):
        """Buckets in launch order. A parameter of IN_PLACE_BYTES or more is a bucket of its own; the smaller
        ones fill flat buckets in backward order, across the large ones (a large parameter does not cut a
        flat bucket short: fewer, fuller all-reduces). Launch order is by each bucket's last parameter to
        be ready, the same on every rank."""
        alone = self.compress is None  # compression needs the flat buffer to cast
        order = list(reversed(self.named))
        position = {id(p): i for i, (_, p) in enumerate(order)}
        buckets, current, size = [], [], 0
        for name, p in order:
            if alone and p.data.nbytes >= IN_PLACE_BYTES:
                buckets.append(([(name, p)], True))
                continue
            if current and (size + p.data.nbytes > cap_bytes or p.data.dtype != current[-1][1].data.dtype):
                buckets.append((current, False))
                current, size = [], 0
            current.append((name, p))
            size += p.data.nbytes
        if current:
            buckets.append((current, False))
        buckets.sort(key=lambda b: position[id(b[0][-1][1])])
        return [_Bucket(i, params, params[0][1].data.dtype, in_place=in_place)
                for i, (params, in_place) in enumerate(buckets)]

    # --- during backward ---

    def _grad_ready(self, p):
        if not self._syncing:
            return
        bucket = self._bucket_of[id(p)]
        g = p.grad.data
        if bucket.in_place and g.flags.c_contiguous and g.flags.writeable and g.dtype == p.data.dtype:
            if self._scale != 1.0:
                g *= g.dtype.type(self._scale)  # divided by the world size first: the sum is then the mean
            bucket.array = g
        else:
            offset, n = bucket.offsets[id(p)]
            if bucket.buffer is None:
                bucket.buffer = np.zeros(sum(size for _, size in bucket.offsets.values()), p.data.dtype)
            # the copy into the bucket, scaled on the way (by 1 when the trainer pre-divided the loss)
            np.multiply(g.reshape(-1), self._scale, out=bucket.buffer[offset:offset + n], casting="same_kind")
            bucket.array = bucket.buffer
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()
        for b in self.buckets[: self._next_launch]:  # let the backend make progress on what is in flight
            if b.handle is not None:
                b.handle.test()

    def _launch_ready(self):
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) != len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket):
        bucket.launched_at = time.perf_counter()
        if self.compress == "fp16":
            bucket.wire = bucket.buffer.astype(np.float16)
            bucket.handle = self.comm.iallreduce(bucket.wire, "sum")
        else:
            bucket.handle = self.comm.iallreduce(bucket.array, "sum")
        self.allreduce_calls += 1

    # --- after backward ---

    def synchronize(self):
        """Wait for every bucket, average, and point each parameter's .grad at its averaged gradient."""
        if not self._syncing:
            return
        missing = [(n, p) for n, p in self.named if id(p) not in self._bucket_of[id(p)].ready]
        if missing:
            if not self.allow_unused:
                names = ", ".join(n for n, _ in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise UnusedParameters(
                    f"DataParallel: {len(missing)} parameter(s) received no gradient this step: {names}. "
                    "Use them in the loss, or pass allow_unused=True to treat their gradients as zero"
                )
            for n, p in missing:
                bucket = self._bucket_of[id(p)]
                offset, size = bucket.offsets[id(p)]
                if bucket.buffer is None:
                    bucket.buffer = np.zeros(sum(s for _, s in bucket.offsets.values()), p.data.dtype)
                bucket.buffer[offset:offset + size] = 0
                bucket.array = bucket.buffer
                bucket.ready.add(id(p))
            self._launch_ready()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.finished_at = time.perf_counter()
            if self.tracer is not None:
                self.tracer.span(f"allreduce bucket {bucket.index}", bucket.launched_at, bucket.finished_at, "comm")
            if self.compress == "fp16":
                bucket.buffer[...] = bucket.wire
                bucket.wire = None
            if bucket.array is not bucket.buffer:  # reduced in place: .grad already holds the mean
                p = bucket.params[0][1]
                if p.grad is None or p.grad.data is not bucket.array:
                    p.grad = Tensor._from_op(bucket.array, None)
            else:
                for _, p in bucket.params:
                    offset, n = bucket.offsets[id(p)]
                    p.grad = Tensor._from_op(bucket.buffer[offset:offset + n].reshape(p.data.shape), None)
            bucket.array = None
            bucket.ready.clear()
            bucket.handle = None
        self._next_launch = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally; the next synchronized step reduces the sum."""
        previous = self._syncing
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = previous

    # --- as a module ---

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def close(self):
        for h in self._hooks:
            h.remove()


def _describe(entry):
    if entry is None:
        return "absent"
    name, shape, dtype = entry
    return f"{name} {list(shape)} {dtype}"
