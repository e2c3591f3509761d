"""Tensors on the wire: arrays to TensorChunk messages of a few MB and back, with every field checked."""

import math

import numpy as np

from ..serialization import brief_repr
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
    shape = list(array.shape)
    for start, stop in chunk_ranges(flat.size, flat.itemsize, chunk_bytes):
        yield ps_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=start, data=flat[start:stop].tobytes())


MESSAGE_SLACK = 64 * 1024  # bytes of a message beyond its tensor data that a kept view may hold on to


class Assembler:
    """Collects chunks into whole arrays, refusing anything that does not fit `expected` (name -> (shape, dtype)).

    out: optional name -> C-contiguous array of the expected shape and dtype to fill in place (a model's
    parameters) instead of new arrays. copy=False keeps the chunks where they arrived (segments()).
    """

    def __init__(self, expected, out=None, copy=True):
        self.expected = expected
        self.out = out or {}
        self.copy = copy  # False: keep each chunk as a view of its message (see segments())
        self.arrays = {}
        self.views = {}
        self.filled = {}
        self.empty = set()  # tensors that have had their one empty chunk

    def add(self, chunk):
        name = chunk.name
        if name not in self.expected:
            raise WireError(f"unknown parameter {brief_repr(name)}")
        shape, dtype = self.expected[name]
        if chunk.dtype != np.dtype(dtype).name:
            raise WireError(f"{name}: dtype {brief_repr(chunk.dtype)}, expected {np.dtype(dtype).name}")
        if tuple(chunk.shape) != tuple(shape):
            raise WireError(f"{name}: shape {brief_repr(list(chunk.shape))}, expected {list(shape)}")
        wire = DTYPES[chunk.dtype]
        if len(chunk.data) % wire.itemsize:
            raise WireError(f"{name}: {len(chunk.data)} bytes is not a whole number of {chunk.dtype} elements")
        n = len(chunk.data) // wire.itemsize
        size = math.prod(shape)
        if chunk.offset < 0 or chunk.offset + n > size:
            raise WireError(f"{name}: chunk [{chunk.offset}, {chunk.offset + n}) runs outside {size} elements")
        if n == 0:  # one is fine (a tensor of no elements, or a chunker's last); endless ones would each be kept
            if name in self.empty:
                raise WireError(f"{name}: a second empty chunk (a tensor's chunks carry its elements)")
            self.empty.add(name)
        filled = self.filled.setdefault(name, 0)
        # in order, without gaps or repeats: then `filled` proves every element arrived exactly once
        if chunk.offset != filled:
            raise WireError(f"{name}: chunk at element {chunk.offset}, expected {filled} "
                            "(a tensor's chunks come in order, without gaps or repeats)")
        values = np.frombuffer(chunk.data, wire)
        if not self.copy and getattr(chunk, "message_size", 0) > values.nbytes + MESSAGE_SLACK:
            values = values.copy()  # a view would keep the whole message (padding, unknown fields) alive
        if self.copy:
            flat = self.arrays.get(name)
            if flat is None:
                flat = self.arrays[name] = self._target(name, shape, dtype, size)
            flat[chunk.offset:chunk.offset + n] = values
        else:
            self.views.setdefault(name, []).append((chunk.offset, values))
        self.filled[name] += n
        return values

    def _target(self, name, shape, dtype, size):
        target = self.out.get(name)
        if target is None:
            return np.empty(size, dtype)
        if target.shape != tuple(shape) or target.dtype != dtype or not target.flags.c_contiguous:
            raise ValueError(f"{name}: the output array is {target.shape} {target.dtype}"
                             f"{'' if target.flags.c_contiguous else ' (not C-contiguous)'}, "
                             f"expected {tuple(shape)} {np.dtype(dtype)}")
        return target.reshape(-1)

    def _check_complete(self):
        for name, (shape, dtype) in self.expected.items():
            if name not in self.filled:
                raise WireError(f"parameter {name!r} is missing")
            if self.filled[name] != math.prod(shape):
                raise WireError(f"{name}: {self.filled[name]} of {math.prod(shape)} elements arrived")

    def result(self):
        """name -> array, once every expected tensor arrived complete."""
        self._check_complete()
        return {name: self.arrays[name].reshape(self.expected[name][0]) for name in self.expected}

    def segments(self):
        """name -> [(offset, flat read-only view of the message)], once every expected tensor arrived complete
        (made with copy=False: no byte has been copied)."""
        self._check_complete()
        return self.views


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


# --- the two bulk messages, encoded and decoded by hand ------------------------------------------------
#
# PushRequest and PullReply carry megabytes of tensor data. The protobuf runtime copies a bytes field
# several times on the way (into the message, into the serialized string, out again when parsing); these
# functions write and read the very same wire format (protos/distbp/ps/v1/ps.proto) with one copy per
# side, and the tensor bytes are read straight out of the received buffer.


class Chunk:
    """A decoded TensorChunk; `data` is a view into the received message."""

    __slots__ = ("name", "dtype", "shape", "offset", "data", "message_size")

    def __init__(self):
        self.name, self.dtype, self.shape, self.offset, self.data = "", "", [], 0, b""
        self.message_size = 0  # of the whole message the data is a view of


def _varint(value):
    value &= (1 << 64) - 1  # negative int32/int64 travel as their 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def chunk_ranges(size, itemsize, chunk_bytes=CHUNK_BYTES):
    """[(start, stop)] element ranges of a tensor's chunks: what encode_chunks sends."""
    per_chunk = max(chunk_bytes // itemsize, 1)
    return [(start, min(start + per_chunk, size)) for start in range(0, max(size, 1), per_chunk)]


ALIGN = 16  # bytes: a received message's buffer starts 16-byte aligned, so its tensor data will too


def _padding(size):
    """A TensorChunk `padding` field (number 6) of exactly `size` bytes (2 <= size < 130)."""
    return _varint(6 << 3 | 2) + _varint(size - 2) + bytes(size - 2)


def encode_chunks(name, array, ints, chunk_field, chunk_bytes=CHUNK_BYTES):
    """Serialized messages {int fields, TensorChunk} for `array`, one per chunk.

    ints: [(field number, value)] of the enclosing message (worker id and version of a PushRequest,
    version of a PullReply); chunk_field: the TensorChunk's field number (3 in PushRequest, 2 in PullReply).
    The tensor data starts ALIGN-aligned in each message (the padding field), so the receiver can compute
    on it in place: numpy and BLAS copy misaligned float arrays before using them.
    """
    dtype = np.dtype(array.dtype).name
    if dtype not in DTYPES:
        raise WireError(f"{name}: dtype {dtype} cannot travel (float32 or float64 only)")
    flat = np.ascontiguousarray(array, dtype=DTYPES[dtype]).reshape(-1)
    prefix = b"".join(_varint(number << 3) + _varint(value) for number, value in ints if value)
    prefix += _varint(chunk_field << 3 | 2)
    fields = _field(1, name.encode()) + _field(2, dtype.encode())
    if array.shape:
        fields += _field(3, b"".join(_varint(n) for n in array.shape))
    for start, stop in chunk_ranges(flat.size, flat.itemsize, chunk_bytes):
        data = memoryview(flat[start:stop]).cast("B")
        head = fields + (_varint(4 << 3) + _varint(start) if start else b"")
        if not data.nbytes:
            yield prefix + _varint(len(head)) + head
            continue
        data_tag = _varint(5 << 3 | 2) + _varint(data.nbytes)
        pad = 2
        for _ in range(4):  # the chunk's length prefix grows with the padding: settle both
            before_data = len(prefix) + len(_varint(len(head) + pad + len(data_tag) + data.nbytes)) + len(head)
            need = -(before_data + len(data_tag)) % ALIGN
            need += ALIGN if need < 2 else 0
            if need == pad:
                break
            pad = need
        length = _varint(len(head) + pad + len(data_tag) + data.nbytes)
        yield b"".join((prefix, length, head, _padding(pad), data_tag, data))


def _read_varint(buf, pos, end=None, low_64=True, max_bytes=10):
    """(value, position after it) of the varint at buf[pos:], which must end before `end`: its low 64 bits,
    as protobuf reads an integer (low_64 False: all of it, for a length, which must be small anyway).
    Tags and lengths are 32-bit: protobuf refuses them written in more than 5 bytes (max_bytes)."""
    end = len(buf) if end is None else end
    stop = min(end, pos + max_bytes)
    result = shift = 0
    while True:
        if pos >= stop:
            if stop < end:
                raise WireError("malformed varint")
            raise WireError("truncated message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result & _U64 if low_64 else result), pos
        shift += 7
        if shift > 63:
            raise WireError("malformed varint")


_U64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1
_MAX_GROUP_DEPTH = 100  # protobuf's own recursion limit
MAX_FIELDS = 1000


def _fields(buf, start, end):
    """(field number, wire type, value or (begin, end)) for each field of buf[start:end]; unknown fields of
    every wire type are skipped, as protobuf's own parsers skip them."""
    pos = start
    fields = 0
    while pos < end:
        fields += 1
        if fields > MAX_FIELDS:  # ours have a handful: millions of tiny unknown ones are only work for us
            raise WireError(f"a message of more than {MAX_FIELDS} fields")
        key, pos = _read_varint(buf, pos, end, max_bytes=5)
        number, kind = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD:
            raise WireError(f"field number {number} out of range")
        if kind == 3:  # a group (deprecated, never one of ours): skipped whole, up to its end tag
            pos = _skip_group(buf, pos, end, number)
            continue
        value, pos = _field_value(buf, pos, end, kind)
        if kind in (0, 2):
            yield number, kind, value
    if pos != end:
        raise WireError("truncated message")


def _field_value(buf, pos, end, kind):
    """(value, position after it) of a field of wire type `kind` (not a group) starting at pos: a varint's
    value, a length-delimited field's (begin, end), None for the fixed-size ones."""
    if kind == 0:
        return _read_varint(buf, pos, end)
    if kind == 2:
        length, pos = _read_varint(buf, pos, end, low_64=False, max_bytes=5)
        if pos + length > end:
            raise WireError("a field runs past the end of the message")
        return (pos, pos + length), pos + length
    if kind in (1, 5):
        return None, pos + (8 if kind == 1 else 4)
    raise WireError(f"unsupported wire type {kind}")


def _skip_group(buf, pos, end, number):
    """The position after the group `number` that starts at pos (after its start tag); groups nest at most
    as deep as protobuf allows."""
    open_groups = [number]
    fields = 0
    while open_groups:
        if pos >= end:
            raise WireError("a group runs past the end of the message")
        fields += 1
        if fields > MAX_FIELDS:
            raise WireError(f"a group of more than {MAX_FIELDS} fields")
        key, pos = _read_varint(buf, pos, end, max_bytes=5)
        inner, kind = key >> 3, key & 7  # (protobuf does not check the numbers of what it skips)
        if kind == 4:
            if inner != open_groups[-1]:
                raise WireError(f"group {open_groups[-1]} ends with the end tag of {inner}")
            open_groups.pop()
        elif kind == 3:
            if len(open_groups) >= _MAX_GROUP_DEPTH:
                raise WireError("groups nested too deeply")
            open_groups.append(inner)
        else:
            _, pos = _field_value(buf, pos, end, kind)
    if pos > end:
        raise WireError("a group runs past the end of the message")
    return pos


def _signed(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value):
    """An int32 field as protobuf reads it: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _text(buf, start, end, what):
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"the {what} is not valid UTF-8") from None


MAX_DIMENSIONS = 32  # a longer shape is no tensor's (and decoding one costs a Python loop per entry)


def _check_dimensions(shape):
    if len(shape) > MAX_DIMENSIONS:
        raise WireError(f"a shape of more than {MAX_DIMENSIONS} dimensions")


def _decode_chunk(buf, start, end):
    chunk = Chunk()
    chunk.message_size = len(buf)
    for number, kind, value in _fields(buf, start, end):
        if number == 1 and kind == 2:
            chunk.name = _text(buf, *value, "tensor name")
        elif number == 2 and kind == 2:
            chunk.dtype = _text(buf, *value, "dtype")
        elif number == 3 and kind == 2:  # packed
            pos, stop = value
            while pos < stop:
                n, pos = _read_varint(buf, pos, stop)
                chunk.shape.append(_signed(n))
                _check_dimensions(chunk.shape)
        elif number == 3 and kind == 0:
            chunk.shape.append(_signed(value))
            _check_dimensions(chunk.shape)
        elif number == 4 and kind == 0:
            chunk.offset = _signed(value)
        elif number == 5 and kind == 2:
            chunk.data = buf[value[0]:value[1]]
    return chunk


def decode_message(data, ints, chunk_field, unsigned=(), int32=()):
    """(dict of the int fields `ints` {number: name}, Chunk) from a serialized PushRequest or PullReply.

    The int fields are int64 except the numbers in `unsigned` (uint64) and `int32`."""
    buf = memoryview(data)
    values = {name: 0 for name in ints.values()}
    chunks = []
    for number, kind, value in _fields(buf, 0, len(buf)):
        if number in ints and kind == 0:
            values[ints[number]] = value if number in unsigned else _int32(value) if number in int32 else _signed(value)
        elif number == chunk_field and kind == 2:
            chunks.append(value)
    if not chunks:
        raise WireError("a message without a tensor chunk")
    if len(chunks) == 1:
        return values, _decode_chunk(buf, *chunks[0])
    for part in chunks:  # each part is a whole message of its own
        for _ in _fields(buf, *part):
            pass
    # a message field given more than once is merged, as protobuf merges it: the same as parsing the
    # concatenation of its parts (a copy, on this path only; no encoder of distbp's splits a chunk)
    joined = b"".join(bytes(buf[a:b]) for a, b in chunks)
    return values, _decode_chunk(memoryview(joined), 0, len(joined))
