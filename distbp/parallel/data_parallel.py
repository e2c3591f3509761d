"""DataParallel: every rank holds the whole model; gradients are averaged over ranks during backward.

Parameters are grouped into flat buckets of about `bucket_cap_mb`, in reverse registration order (roughly
the order in which backward finishes them). Each parameter's gradient is written straight into its slice
of its bucket: DataParallel makes that slice the parameter's gradient destination, and the ops that
compute weight gradients (Linear, matmul) write there with `out=`; any other gradient is copied in when
it is final (the autograd engine's post-accumulate hook). When a bucket is full its all-reduce starts at
once, while backward goes on with earlier layers. Buckets are launched strictly in index order on every
rank (a different order on different ranks would pair the wrong buffers or hang). `synchronize()` waits
for them all and leaves each parameter's `.grad` as a view of its bucket (as PyTorch DDP's
gradient_as_bucket_view: the next step's backward overwrites it).
"""

import contextlib
import time
import zlib

import numpy as np

from ..autograd.tensor import Tensor
from ..comm.base import CommError


class ModelMismatch(CommError):
    """Ranks hold different models (names, shapes or dtypes differ)."""


class UnusedParameters(RuntimeError):
    pass


class _Bucket:
    def __init__(self, index, params, dtype, comm, shared):
        self.index = index
        self.params = params  # (name, parameter) pairs
        self.offsets = {}
        offset = 0
        for name, p in params:
            self.offsets[id(p)] = (offset, p.data.size)
            offset += p.data.size
        # shared memory between the ranks of one machine (MPI), unless compressed copies travel instead
        self.buffer = comm.buffer(offset, dtype) if shared else np.zeros(offset, dtype)
        # each parameter's slice of the buffer, shaped like it: where its gradient is written
        self.views = {id(p): self.buffer[o:o + n].reshape(p.data.shape) for _, p in params
                      for o, n in [self.offsets[id(p)]]}
        self.wire = None  # float16 copy when compressing
        self.ready = set()
        self.handle = None
        self.launched_at = self.finished_at = None

    @property
    def nbytes(self):
        return sum(p.data.nbytes for _, p in self.params)


_CANNOT_GO_ON = (". This DataParallel cannot go on: build a new one on every rank. (If the last backward raised "
                 "part-way, that is the cause: some of its buckets were sent.)")


class DataParallel:
    """Wrap `model` for data-parallel training over communicator `comm`.

    bucket_cap_mb: gradient bytes per all-reduce (default 25, as in PyTorch DDP).
    allow_unused: treat parameters that got no gradient in a step as zero instead of raising.
    compress: None, or "fp16" to exchange gradients as float16 (halves the bytes; less precise).
    tracer: optional object with span(name, start, end, lane) for timelines.
    average: True (as PyTorch DDP): after synchronize(), .grad is the mean over ranks, which costs a pass
        over every gradient to divide it by the world size. False: .grad is the sum over ranks, with no
        pass of its own -- the mean too, when every gradient comes from a loss already multiplied by
        1 / world_size before backward (what distbp's trainer does: one scalar multiply instead). What is
        reduced is each rank's whole .grad: a gradient left from the last step (no zero_grad) is, like
        the rest, identical on every rank, so the mean keeps it once and the sum counts it world_size times.

    Between backward and synchronize() the gradients belong to the all-reduce: a bucket may be in flight
    (in shared memory, other ranks read and write it), so read or change `.grad` only after
    synchronize(); to change gradients before they are reduced, change the loss. A second backward
    before synchronize() is an error (outside no_sync()). Which parameters train is fixed at construction
    (a parameter frozen or unfrozen later is an error; one added later is not synchronized, as in PyTorch
    DDP): build a new DataParallel after changing the model. After synchronize() raised, the wrapper
    cannot continue. Every other attribute (state_dict, train, eval, ...) is the module's own: a state_dict
    has the module's keys, with no "module." prefix.

    The wrapper makes its collectives on a copy of `comm` (comm.dup()), so the caller's own collectives on
    `comm` (a loss all-reduced between backward and synchronize(), another DataParallel) never pair with a
    bucket: when a bucket starts depends on the rank (with allow_unused or no_sync(), one rank may start it
    in backward, another only in synchronize()). close() gives the copy back.
    """

    def __init__(self, model, comm, bucket_cap_mb=25.0, allow_unused=False, compress=None, tracer=None,
                 average=True):
        if compress not in (None, "fp16"):
            raise ValueError(f"DataParallel: compress must be None or 'fp16', not {compress!r}")
        if (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float, np.integer, np.floating))
                or not bucket_cap_mb > 0):  # (nan is not > 0)
            raise ValueError(f"DataParallel: bucket_cap_mb must be a positive number of MB, got {bucket_cap_mb!r}")
        if getattr(model, "_data_parallel", None) is not None:
            raise RuntimeError("DataParallel: this model is already wrapped by a DataParallel (its hooks would "
                               "all-reduce every gradient twice); close() that one first")
        self.module = model
        self.allow_unused, self.compress, self.tracer = allow_unused, compress, tracer
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self._failed = None  # the error after which this wrapper cannot continue
        # the options every rank must share: the buckets, and what travels in them, must pair up
        options = {"bucket_cap_mb": float(bucket_cap_mb), "compress": compress, "allow_unused": bool(allow_unused),
                   "average": bool(average)}
        self.comm = comm.dup()
        self.buckets = []
        try:
            self._check_same_model(options)
            self._broadcast_state()
            self.buckets = self._make_buckets(bucket_cap_mb * 1024 * 1024)
        except BaseException:
            self._give_back()
            raise
        self._bucket_of = {id(p): b for b in self.buckets for _, p in b.params}
        self._name_of = {id(p): n for n, p in self.named}
        self._accumulated = set()  # ids of parameters that got a gradient under no_sync() since synchronize()
        self._next_launch = 0
        self._syncing = True
        self.average = average
        self._scale = 1.0 / comm.size if average else 1.0
        self.allreduce_calls = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for _, p in self.named]
        model._data_parallel = self

    # --- start-up ---

    def _check_same_model(self, options):
        """Every rank holds the same parameters (frozen ones too) and was given the same options."""
        # read-only arrays are compared instead of broadcast: every rank must agree which those are, or the
        # broadcasts would pair up the wrong arrays
        mine = [(n, tuple(p.data.shape), str(p.data.dtype), bool(p.requires_grad), _read_only(p.data))
                for n, p in self.module.named_parameters()]
        mine += [(n, tuple(np.shape(_array_of(b))), str(getattr(_array_of(b), "dtype", type(b).__name__)), "buffer",
                  _read_only(_array_of(b)))
                 for n, b in self.module.named_buffers()]  # broadcast too: they must pair up
        everyone = self.comm.allgather((mine, options))
        reference, reference_options = everyone[0]
        for rank, (theirs, their_options) in enumerate(everyone[1:], 1):
            for key, value in their_options.items():
                if value != reference_options[key]:
                    raise ModelMismatch(f"DataParallel: rank {rank} was given {key}={value!r} but rank 0 "
                                        f"{key}={reference_options[key]!r}: every rank must use the same options")
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
        fixed = []  # (kind, name, array) that cannot be overwritten: compared by checksum below
        # parameters (frozen ones too: every replica runs rank 0's model), then buffers
        arrays = [("parameter", n, p.data, p) for n, p in self.module.named_parameters()]
        arrays += [("buffer", n, _array_of(b), None) for n, b in self.module.named_buffers()]
        for kind, name, arr, param in arrays:
            if not isinstance(arr, np.ndarray):
                continue
            if _read_only(arr):
                fixed.append((kind, name, arr))  # a frozen table mapped read-only from a file, say
                continue
            if arr.flags.c_contiguous:
                self.comm.broadcast(arr, root=0)
            else:  # broadcast needs one contiguous block
                block = np.ascontiguousarray(arr)
                self.comm.broadcast(block, root=0)
                arr[...] = block
            if param is not None:
                param._bump_version()
        # what cannot be overwritten must already be equal
        digests = self.comm.allgather([zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for _, _, a in fixed])
        for rank, theirs in enumerate(digests[1:], 1):
            for (kind, name, _), mine, other in zip(fixed, digests[0], theirs):
                if mine != other:
                    raise ModelMismatch(f"DataParallel: the read-only {kind} {name} differs between rank 0 and "
                                        f"rank {rank}, and cannot be overwritten with rank 0's values")

    def _make_buckets(self, cap_bytes):
        """Buckets in launch order: parameters in backward order, cut where the next one would pass the cap
        (or changes dtype). Every parameter's gradient destination is its slice of its bucket."""
        buckets, current, size = [], [], 0
        for name, p in reversed(self.named):
            if current and (size + p.data.nbytes > cap_bytes or p.data.dtype != current[-1][1].data.dtype):
                buckets.append(current)
                current, size = [], 0
            current.append((name, p))
            size += p.data.nbytes
        if current:
            buckets.append(current)
        shared = self.compress is None  # with compression, a float16 copy of the bucket is what is reduced
        buckets = [_Bucket(i, params, params[0][1].data.dtype, self.comm, shared) for i, params in enumerate(buckets)]
        for b in buckets:
            for _, p in b.params:
                p.set_grad_destination(b.views[id(p)])
        return buckets

    # --- during backward ---

    def _grad_ready(self, p):
        self._check_usable()
        if not self._syncing:
            if any(b.ready for b in self.buckets):  # its bucket may be in flight: the gradient would be lost or half-counted
                self._fail(
                    f"DataParallel: parameter {self._name_of[id(p)]} got a gradient under no_sync() after a backward "
                    "outside it, before synchronize() (call synchronize() after that backward, or run the "
                    "synchronized backward last)")
            self._accumulated.add(id(p))  # its .grad holds a gradient for the next synchronize()
            return
        bucket = self._bucket_of[id(p)]
        if id(p) in bucket.ready:
            self._fail(
                f"DataParallel: parameter {self._name_of[id(p)]} got a second gradient before synchronize() "
                "(call synchronize() after every backward, or accumulate inside no_sync())")
        self._into_bucket(p.grad.data, bucket.views[id(p)])
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()
        for b in self.buckets[: self._next_launch]:  # let the backend make progress on what is in flight
            if b.handle is not None:
                b.handle.test()

    def _fail(self, message):
        """Raise, and refuse from now on: the gradient was already added into its bucket, which may be in flight
        (its sum, here and on the other ranks, is no longer this step's)."""
        self._failed = message
        raise RuntimeError(message + _CANNOT_GO_ON)

    def _into_bucket(self, g, view):
        """Put gradient `g` in its bucket slice `view`, divided by the world size if the mean is wanted (no
        pass when the trainer pre-divided the loss, none to copy when its op wrote it there already)."""
        scale = self._scale
        if g is not view:  # not written in place by its op: copied in, scaled on the way
            if scale != 1.0:
                np.multiply(g, view.dtype.type(scale), out=view, casting="same_kind")
            else:
                np.copyto(view, g, casting="same_kind")
        elif scale != 1.0:
            view *= view.dtype.type(scale)

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
            bucket.handle = self.comm.iallreduce(bucket.buffer, "sum")
        self.allreduce_calls += 1

    # --- after backward ---

    def synchronize(self):
        """Wait for every bucket, average, and point each parameter's .grad at its averaged gradient.

        With allow_unused, a parameter that no rank used this step and whose .grad was None keeps .grad None
        (as in PyTorch DDP), so that the optimizer leaves it alone; one used on some ranks gets their sum
        (or mean) of gradients. Raising leaves the wrapper unusable: the ranks' buckets may no longer pair up."""
        if not self._syncing:
            raise RuntimeError("DataParallel: synchronize() inside no_sync(): the gradients accumulated there are "
                               "reduced by the first synchronize() after leaving it")
        self._check_usable()
        try:
            self._synchronize()
        except Exception as e:
            self._failed = f"{type(e).__name__}: {e}"
            raise

    def _check_usable(self):
        if self._failed is not None:
            raise RuntimeError(f"DataParallel cannot continue after this error: {self._failed}")

    def _check_trainable(self):
        """Which parameters train is fixed at construction: the buckets and hooks were made for them."""
        changed = [n for n, p in self.named if not p.requires_grad] + [n for n, p in self._frozen if p.requires_grad]
        if changed:
            raise RuntimeError(f"DataParallel: parameter(s) {', '.join(changed)} changed requires_grad after "
                               "DataParallel was built: build a new DataParallel after freezing or unfreezing")

    def _synchronize(self):
        self._check_trainable()
        if (self.buckets and not self.allow_unused and not self._accumulated
                and not any(b.ready for b in self.buckets)):
            # a second call after one backward (with allow_unused, a step without gradients all-reduces
            # zeros: a rank with no data this step still takes part)
            raise RuntimeError("DataParallel: synchronize(): no parameter received a gradient since the last "
                               "synchronize(); call it once after each backward")
        # not in a bucket yet: no gradient in the last backward (maybe some under no_sync())
        pending = [(n, p) for n, p in self.named if id(p) not in self._bucket_of[id(p)].ready]
        missing = [(n, p) for n, p in pending if id(p) not in self._accumulated or p.grad is None]
        if missing and not self.allow_unused:
            names = ", ".join(n for n, _ in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UnusedParameters(
                f"DataParallel: {len(missing)} parameter(s) received no gradient this step: {names}. "
                "Use them in the loss, or pass allow_unused=True to treat their gradients as zero"
            )
        unused_here = []  # (allow_unused) parameters this rank gave no gradient, not even a zeroed one
        for n, p in pending:
            bucket = self._bucket_of[id(p)]
            view = bucket.views[id(p)]
            if p.grad is not None:
                # what it accumulated under no_sync(), or (allow_unused) what .grad held before this step, kept
                # or zeroed in place: this rank's .grad goes in whole, as any used parameter's does
                self._into_bucket(p.grad.data, view)
            else:
                unused_here.append(p)
                view[...] = 0
            bucket.ready.add(id(p))
        if pending:
            self._launch_ready()
        unused = self._unused_everywhere(unused_here)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.finished_at = time.perf_counter()
            if self.tracer is not None:
                self.tracer.span(f"allreduce bucket {bucket.index}", bucket.launched_at, bucket.finished_at, "comm")
            if self.compress == "fp16":
                bucket.buffer[...] = bucket.wire
                bucket.wire = None
            for _, p in bucket.params:
                view = bucket.views[id(p)]
                if id(p) in unused:
                    p.grad = None  # no rank used it: the optimizer must not step it (momentum, weight decay)
                elif p.grad is None or p.grad.data is not view:
                    p.grad = Tensor._from_op(view, None)
            bucket.ready.clear()
            bucket.handle = None
        self._next_launch = 0
        self._accumulated.clear()

    def _unused_everywhere(self, unused_here):
        """ids of the parameters that no rank gave a gradient this step, not even a zeroed one (with
        allow_unused: one small all-reduce)."""
        if not self.allow_unused:
            return set()
        flags = np.zeros(len(self.named), np.float32)
        mine = {id(p) for p in unused_here}
        for i, (_, p) in enumerate(self.named):
            flags[i] = id(p) not in mine
        self.comm.allreduce(flags)  # how many ranks used each parameter
        return {id(p) for (_, p), used in zip(self.named, flags) if not used}

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

    def __getattr__(self, name):
        # what the wrapper does not define is the module's: parameters, state_dict, train, eval, zero_grad, ...
        if name == "module":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def close(self):
        """Detach from the model: no more hooks, gradients go back to arrays of their own, and the copy of
        the communicator is given back. Collective (every rank closes its DataParallel); also after an
        error, so that the model can be wrapped again."""
        try:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._give_back()
        finally:
            if getattr(self.module, "_data_parallel", None) is self:
                self.module._data_parallel = None

    def _give_back(self):
        for _, p in self.named:
            p.set_grad_destination(None)
        for bucket in self.buckets:
            if bucket.handle is None:  # one still in flight (never waited for, after an error): comm.close()
                self.comm.release(bucket.buffer)
            bucket.handle = None
        self.comm.close()


def _array_of(buffer):
    """A buffer's array (a buffer is an array, a Tensor or another value)."""
    return buffer.data if isinstance(buffer, Tensor) else buffer


def _read_only(array):
    return isinstance(array, np.ndarray) and not array.flags.writeable


def _describe(entry):
    if entry is None:
        return "absent"
    name, shape, dtype, kind, read_only = entry
    what = " (buffer)" if kind == "buffer" else "" if kind else " (frozen)"
    return f"{name} {list(shape)} {dtype}{what}{' (read-only)' if read_only else ''}"
