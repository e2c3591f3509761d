"""Sharding a data set over ranks, reshuffled every epoch, and batching a shard."""

import math

import numpy as np

from ..autograd.random import SHUFFLE_STREAM


class ShardSampler:
    """The indices that one rank visits in one epoch.

    Every rank draws the same permutation of range(n) (from seed and epoch) and takes every world_size-th
    index, starting at its rank. So the k-th batches of all ranks together are exactly the k-th batch of
    one process with world_size times the batch size: data-parallel training sees the same data as
    single-process training on the global batch.

    Shards are equal in length: drop_last drops the tail that does not divide by world_size; otherwise
    the permutation is padded by repeating its start.

    The permutation's generator is seeded with [seed, SHUFFLE_STREAM, epoch]: numpy pads a seed with zeros,
    so [seed, epoch] drew epoch 0's order from the same bits as default_rng(seed), which initialises the
    model (see the stream tags in distbp.autograd.random).
    """

    def __init__(self, n, rank=0, world_size=1, shuffle=True, seed=0, drop_last=False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} is not in [0, world_size={world_size})")
        if n < world_size and drop_last:
            raise ValueError(f"ShardSampler: {n} items cannot give each of {world_size} ranks one with drop_last")
        if n < 1:
            raise ValueError("ShardSampler: the data set is empty")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    @property
    def shard_size(self):
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __len__(self):
        return self.shard_size

    def indices(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, SHUFFLE_STREAM, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.shard_size * self.world_size
        if total > self.n:
            order = np.resize(order, total)  # pad by repeating from the start
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        return iter(self.indices().tolist())

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])


class BatchLoader:
    """Batches (x, y) of one rank's shard; `batches(epoch, start)` resumes mid-epoch at batch `start`."""

    def __init__(self, dataset, batch_size, sampler=None, drop_last=False):
        if batch_size < 1:
            raise ValueError(f"BatchLoader: batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.sampler = sampler or ShardSampler(len(dataset), shuffle=False)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch=0, start=0):
        self.sampler.set_epoch(epoch)
        order = self.sampler.indices()
        for b in range(start, len(self)):
            yield self.dataset[order[b * self.batch_size:(b + 1) * self.batch_size]]

    def __iter__(self):
        return self.batches(self.sampler.epoch)
