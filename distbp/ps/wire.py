"""Tensors on the wire: arrays to TensorChunk messages of a few MB and back, with every field checked."""

import math

import numpy as np

from .v1 import ps_pb2

CHUNK_BYTES = 2 * 1024 * 1024  # well under gRPC's 4 MB default message limit
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


class WireError(ValueError):
    """A message that does not describe the expected tensors."""


def to_chunks(name, array, chunk_bytes=CHUNK_BYTES):
    """TensorChunk messages covering `array` (C order, little-endian), each at most chunk_bytes of data."""
    dtype = np.dtype(array.dtype).name
    if dtype not in DTYPES:
        raise WireError(f"{name}: dtype {dtype} cannot travel (float32 or float64 only)")
    flat = np.ascontiguousarray(array, dtype=DTYPES[dtype]).reshape(-1)
    per_chunk = max(chunk_bytes // flat.itemsize, 1)
    shape = list(array.shape)
    for start in range(0, max(flat.size, 1), per_chunk):
        yield ps_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=start,
                                 data=flat[start:start + per_chunk].tobytes())


class Assembler:
    """Collects chunks into whole arrays, refusing anything that does not fit `expected` (name -> (shape, dtype))."""

    def __init__(self, expected):
        self.expected = expected
        self.arrays = {}
        self.filled = {}

    def add(self, chunk):
        name = chunk.name
        if name not in self.expected:
            raise WireError(f"unknown parameter {name!r}")
        shape, dtype = self.expected[name]
        if chunk.dtype != np.dtype(dtype).name:
            raise WireError(f"{name}: dtype {chunk.dtype!r}, expected {np.dtype(dtype).name}")
        if tuple(chunk.shape) != tuple(shape):
            raise WireError(f"{name}: shape {list(chunk.shape)}, expected {list(shape)}")
        wire = DTYPES[chunk.dtype]
        if len(chunk.data) % wire.itemsize:
            raise WireError(f"{name}: {len(chunk.data)} bytes is not a whole number of {chunk.dtype} elements")
        n = len(chunk.data) // wire.itemsize
        size = math.prod(shape)
        if chunk.offset < 0 or chunk.offset + n > size:
            raise WireError(f"{name}: chunk [{chunk.offset}, {chunk.offset + n}) runs outside {size} elements")
        if name not in self.arrays:
            self.arrays[name] = np.empty(size, dtype)
            self.filled[name] = 0
        self.arrays[name][chunk.offset:chunk.offset + n] = np.frombuffer(chunk.data, wire)
        self.filled[name] += n

    def result(self):
        """name -> array, once every expected tensor arrived complete."""
        for name, (shape, dtype) in self.expected.items():
            if name not in self.arrays:
                raise WireError(f"parameter {name!r} is missing")
            if self.filled[name] != math.prod(shape):
                raise WireError(f"{name}: {self.filled[name]} of {math.prod(shape)} elements arrived")
        return {name: self.arrays[name].reshape(self.expected[name][0]) for name in self.expected}


def assign_shards(sizes, num_shards):
    """name -> shard for parameters {name: size}: largest first onto the least-loaded shard.

    Deterministic (ties broken by name and shard index), so every server and client computes the same.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    load = [0] * num_shards
    owner = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        shard = min(range(num_shards), key=lambda s: (load[s], s))
        owner[name] = shard
        load[shard] += size
    return owner
