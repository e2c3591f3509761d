"""The pluggable part of the training loop: how a rank's local gradients become the update.

A step object has rank, world_size and loss_scale (the trainer runs backward on loss * loss_scale), and:
  prepare(model, optimizer)   once, before the first step (broadcast, hooks, registration)
  reduce_gradients(model)     after backward: make every rank's .grad the global gradient
  apply(model, optimizer)     turn the gradients into new parameters; returns None, or the step the run
                              must go on from when they could not be applied (a parameter-server worker
                              that had to rejoin its servers)
  all_sum(values)             sum a few numbers over ranks (losses, accuracy counts)
  gather(obj)                 every rank's small object, on every rank
  close()
"""

import numpy as np

from ..parallel import DataParallel


class LocalStep:
    """One process: the optimizer applies this process's own gradients."""

    rank = 0
    world_size = 1
    backend = "local"
    loss_scale = 1.0

    def prepare(self, model, optimizer, tracer=None):
        pass

    def reduce_gradients(self, model):
        pass

    def apply(self, model, optimizer):
        optimizer.step()

    def all_sum(self, values):
        return list(values)

    def gather(self, obj):
        return [obj]

    def close(self):
        pass


class AllReduceStep(LocalStep):
    """Data parallelism over a Communicator: gradients averaged by bucketed all-reduce during backward."""

    def __init__(self, comm, bucket_cap_mb=25.0, allow_unused=False, compress=None):
        self.comm = comm
        self.rank, self.world_size, self.backend = comm.rank, comm.size, comm.backend
        self.options = dict(bucket_cap_mb=bucket_cap_mb, allow_unused=allow_unused, compress=compress)
        self.ddp = None
        # Backward starts from loss / world_size, so each rank's gradients arrive already divided and the
        # all-reduce's sum is the mean: no pass over the gradients to average them (DataParallel
        # average=False). Every gradient the trainer uses comes from that loss.
        self.loss_scale = 1.0 / comm.size

    def prepare(self, model, optimizer, tracer=None):
        self.ddp = DataParallel(model, self.comm, tracer=tracer, average=False, **self.options)

    def reduce_gradients(self, model):
        self.ddp.synchronize()

    def all_sum(self, values):
        totals = np.array(values, dtype=np.float64)
        self.comm.allreduce(totals, "sum")
        return totals.tolist()

    def gather(self, obj):
        return self.comm.allgather(obj)

    def close(self):
        if self.ddp is not None:
            self.ddp.close()


def allreduce_step(config, comm):
    """The AllReduceStep a training config asks for."""
    return AllReduceStep(comm, config.bucket_cap_mb, config.allow_unused,
                         None if config.compress == "none" else config.compress)
