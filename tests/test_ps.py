"""The gRPC parameter server: real servers on 127.0.0.1 with free ports, workers in threads or processes."""

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from distbp.autograd import Tensor
from distbp.comm import run_ranks
from distbp.ps.client import PSClient, PSError, PSStep
from distbp.ps.server import _PUSH_INTS, _PUSH_UINT64, _Refused, serve
from distbp.ps.v1 import ps_pb2, ps_pb2_grpc
from distbp.ps.wire import (ALIGN, CHUNK_BYTES, Assembler, WireError, assign_shards, chunk_ranges, decode_message,
                            encode_chunks, to_chunks)
from distbp.train import Trainer, make_config
from distbp.train.ps_service import build_shard
from distbp.train.steps import allreduce_step

ROOT = Path(__file__).parent.parent


def start_servers(config, num_shards=1, workers=1, token=None, tls=None, **shard_options):
    """In-process shards on free ports; returns (addresses, shards, stop)."""
    servers, shards, addresses = [], [], []
    for s in range(num_shards):
        shard = build_shard(config, s, num_shards, workers, **shard_options)
        server, port = serve(shard, "127.0.0.1", 0, token=token, tls=tls)
        servers.append(server)
        shards.append(shard)
        addresses.append(f"{'localhost' if tls else '127.0.0.1'}:{port}")

    def stop():
        for shard, server in zip(shards, servers):
            shard.stop()
            server.stop(0)

    return addresses, shards, stop


def train_workers(config, addresses, workers, **step_options):
    trainers = [None] * workers

    def body(i):
        step = PSStep(addresses, **step_options)
        trainers[i] = Trainer(config, step)
        trainers[i].fit()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(t is not None for t in trainers)
    return sorted(trainers, key=lambda t: t.strategy.rank)


def params(trainer):
    return {n: p.data.copy() for n, p in trainer.model.named_parameters()}


# --- wire format ----------------------------------------------------------------------------------


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the stubs: pip install -e '.[test]'")
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", str(ROOT / "protos/distbp/ps/v1/ps.proto")])
    assert code == 0
    for name in ("ps_pb2.py", "ps_pb2_grpc.py", "ps_pb2.pyi"):
        generated = (tmp_path / "distbp/ps/v1" / name).read_text()
        committed = (ROOT / "distbp/ps/v1" / name).read_text()
        assert generated == committed, f"distbp/ps/v1/{name} is stale: regenerate it from protos/ (see README)"


def _key(number, kind):
    assert number < 16  # one byte
    return bytes([number << 3 | kind])


def _length_delimited(number, payload):
    assert len(payload) < 128
    return _key(number, 2) + bytes([len(payload)]) + payload


def _push_message(chunk):
    return ps_pb2.PushRequest(worker_id=0, version=0, chunk=chunk).SerializeToString()


def test_the_decoder_refuses_long_shapes_and_swarms_of_fields_without_decoding_them_all():
    # a 15 MB message of 15 million shape entries, or of millions of unknown fields, took seconds of CPU each
    long_shape = _push_message(ps_pb2.TensorChunk(name="w", dtype="float32", shape=[1] * 2_000_000))
    with pytest.raises(WireError, match="a shape of more than 32 dimensions"):
        decode_message(long_shape, _PUSH_INTS, 3, unsigned=_PUSH_UINT64, int32=(1,))
    many = _push_message(ps_pb2.TensorChunk(name="w", dtype="float32", shape=[4]))
    many += b"".join(_key(15, 0) + b"\x01" for _ in range(200_000))  # unknown varint fields
    with pytest.raises(WireError, match="a message of more than 1000 fields"):
        decode_message(many, _PUSH_INTS, 3, unsigned=_PUSH_UINT64, int32=(1,))


def test_a_kept_chunk_does_not_hold_a_message_much_larger_than_its_data():
    # one float with a megabyte of padding, many times over: every message stayed alive until the push ended
    chunk = ps_pb2.TensorChunk(name="w", dtype="float32", shape=[2], offset=0, data=np.ones(1, "<f4").tobytes(),
                               padding=bytes(1 << 20))
    head, decoded = decode_message(_push_message(chunk), _PUSH_INTS, 3, unsigned=_PUSH_UINT64, int32=(1,))
    values = Assembler({"w": ((2,), np.float32)}, copy=False).add(decoded)
    assert values.flags.owndata  # a copy, not a view that keeps the message alive


def test_a_second_empty_chunk_of_a_tensor_is_refused():
    # endless empty chunks were each kept until the push ended; one (a chunker's last) is fine
    assembler = Assembler({"w": ((2,), np.float32)}, copy=False)
    assembler.add(ps_pb2.TensorChunk(name="w", dtype="float32", shape=[2], offset=0, data=np.ones(2, "<f4").tobytes()))
    assembler.add(ps_pb2.TensorChunk(name="w", dtype="float32", shape=[2], offset=2, data=b""))
    with pytest.raises(WireError, match="w: a second empty chunk"):
        assembler.add(ps_pb2.TensorChunk(name="w", dtype="float32", shape=[2], offset=2, data=b""))
    empty = Assembler({"e": ((0,), np.float32)}, copy=False)
    empty.add(ps_pb2.TensorChunk(name="e", dtype="float32", shape=[0], offset=0, data=b""))  # a tensor of none
    with pytest.raises(WireError, match="e: a second empty chunk"):
        empty.add(ps_pb2.TensorChunk(name="e", dtype="float32", shape=[0], offset=0, data=b""))


def test_an_error_echoes_a_long_name_cut_short():
    with pytest.raises(WireError) as err:
        Assembler({"w": ((2,), np.float32)}).add(ps_pb2.TensorChunk(name="x" * 20_000, dtype="float32", shape=[2]))
    assert len(str(err.value)) < 200 and "(20002 characters)" in str(err.value)


def test_the_decoder_merges_a_chunk_given_in_parts_and_skips_groups_as_protobuf_does():
    data = np.arange(4, dtype=np.float32).tobytes()
    head = _length_delimited(1, b"w") + _length_delimited(2, b"float32") + _length_delimited(3, bytes([4]))
    group = _key(15, 3) + _key(1, 0) + bytes([7]) + _key(15, 4)  # an unknown group field, skipped
    message = (_key(1, 0) + bytes([3]) + _length_delimited(3, head + group)
               + _length_delimited(3, _length_delimited(5, data)))  # the chunk field twice: merged
    standard = ps_pb2.PushRequest.FromString(message)
    values, chunk = decode_message(message, {1: "worker_id"}, 3)
    assert values == {"worker_id": 3}
    assert (chunk.name, chunk.dtype, list(chunk.shape), bytes(chunk.data)) == \
           (standard.chunk.name, standard.chunk.dtype, list(standard.chunk.shape), standard.chunk.data)


_CHUNK = _length_delimited(3, _length_delimited(1, b"w") + _length_delimited(2, b"float32"))


def test_the_decoder_reads_integers_as_protobuf_does():
    # int32: the low 32 bits; a 10-byte varint: the low 64 bits
    big_id = bytes([0x85, 0x80, 0x80, 0x80, 0x10])  # 2**32 + 5
    ten_bytes = bytes([0xFF] * 9 + [0x7F])
    message = _key(1, 0) + big_id + _key(2, 0) + ten_bytes + _CHUNK
    standard = ps_pb2.PushRequest.FromString(message)
    values, _ = decode_message(message, {1: "worker_id", 2: "version"}, 3, int32=(1,))
    assert values == {"worker_id": standard.worker_id, "version": standard.version} == {"worker_id": 5, "version": -1}


def _groups(depth):
    return b"".join(_key(15, 3) for _ in range(depth)) + b"".join(_key(15, 4) for _ in range(depth))


@pytest.mark.parametrize("message,error", [
    # a packed varint cut at the field's end must not read on into the next field
    (_length_delimited(3, _length_delimited(3, bytes([0x80])) + _key(4, 0) + bytes([1])), "truncated"),
    (_key(0, 0) + bytes([1]) + _CHUNK, "field number 0 out of range"),
    (bytes([0x80, 0x80, 0x80, 0x80, 0x10]) + bytes([1]) + _CHUNK, "field number 536870912 out of range"),
    (_length_delimited(3, _key(15, 3) + _key(1, 0) + bytes([7])), "group"),  # never ended
    (_groups(101) + _CHUNK, "nested too deeply"),  # protobuf's limit is 100
    (_length_delimited(3, _length_delimited(1, b"\xff\xfe")), "tensor name is not valid UTF-8"),
    # a chunk given in two parts, each of which must be a whole message (here the first stops mid-field)
    (_length_delimited(3, _length_delimited(1, b"w")[:2]) + _length_delimited(3, b"w"), "runs past the end"),
    # tags and lengths are 32-bit: protobuf refuses them padded past 5 bytes
    (bytes([0x88, 0x80, 0x80, 0x80, 0x80, 0x00]) + bytes([1]) + _CHUNK, "malformed varint"),
    (_key(3, 2) + bytes([0x80 | len(_CHUNK[2:]), 0x80, 0x80, 0x80, 0x80, 0x00]) + _CHUNK[2:], "malformed varint"),
], ids=["packed-overrun", "field-0", "field-too-large", "open-group", "deep-groups", "bad-utf8", "broken-part",
        "tag-6-bytes", "length-6-bytes"])
def test_the_decoder_refuses_what_protobuf_refuses(message, error):
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        ps_pb2.PushRequest.FromString(message)
    with pytest.raises(WireError, match=error):
        decode_message(message, {1: "worker_id"}, 3)


def test_large_tensors_travel_in_chunks_below_the_limit():
    array = np.arange(3_000_000, dtype=np.float32).reshape(1000, 3000)
    chunks = list(to_chunks("w", array))
    assert len(chunks) > 1 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert all(c.ByteSize() < 4 * 1024 * 1024 for c in chunks)
    flat = np.concatenate([np.frombuffer(c.data, np.float32) for c in chunks])
    np.testing.assert_array_equal(flat, array.reshape(-1))


@pytest.mark.parametrize("ints", [[(1, 0), (2, 0)], [(1, 3), (2, 1_000_000)], [(1, 2**31 - 1), (2, 2**40), (4, 2**40 + 1)],
                                  [(1, 1), (2, -1), (4, 2**64 - 1), (5, 2**63), (6, 2**63 + 5)]])
@pytest.mark.parametrize("size", [0, 1, 5, 524_287, 524_288, 524_289, 1_500_000])
def test_hand_encoded_push_parses_as_protobuf_with_aligned_data(ints, size):
    array = np.arange(size, dtype=np.float32)
    messages = list(encode_chunks("layer.weight", array, ints, 3))
    assert len(messages) == len(chunk_ranges(size, 4))
    got = []
    for message in messages:
        parsed = ps_pb2.PushRequest.FromString(message)
        fields = dict(ints)
        assert (parsed.worker_id, parsed.version, parsed.sequence, parsed.registration, parsed.step) == (
            fields[1], fields[2], fields.get(4, 0), fields.get(5, 0), fields.get(6, 0))
        assert parsed.chunk.name == "layer.weight" and list(parsed.chunk.shape) == [size]
        assert parsed.chunk.padding.count(0) == len(parsed.chunk.padding)
        if parsed.chunk.data:
            assert message.endswith(parsed.chunk.data)  # written last: it starts where the rest ends
            assert (len(message) - len(parsed.chunk.data)) % ALIGN == 0
        got.append(np.frombuffer(parsed.chunk.data, np.float32))
        head, chunk = decode_message(message, _PUSH_INTS, 3, unsigned=_PUSH_UINT64, int32=(1,))  # as the server
        assert head == {name: fields.get(number, 0) for number, name in _PUSH_INTS.items()}
        assert chunk.offset == parsed.chunk.offset and bytes(chunk.data) == parsed.chunk.data
    np.testing.assert_array_equal(np.concatenate(got), array)


def _small_chunks(array, per_chunk=4):
    return list(to_chunks("w", array, chunk_bytes=per_chunk * array.itemsize))


def test_assembler_fills_given_arrays_in_place():
    array = np.arange(10, dtype=np.float32).reshape(2, 5)
    out = np.zeros_like(array)
    assembler = Assembler({"w": (array.shape, array.dtype)}, out={"w": out})
    for chunk in _small_chunks(array):
        assembler.add(chunk)
    result = assembler.result()
    assert np.shares_memory(result["w"], out)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("order", [[0, 0, 2], [0, 2, 1], [1, 2], [0, 1, 1, 2]])
def test_assembler_refuses_chunks_out_of_order_repeated_or_missing(order):
    # [0, 0, 2] covers the right number of elements, yet [4, 8) never arrived
    array = np.arange(10, dtype=np.float32)
    chunks = _small_chunks(array)
    assembler = Assembler({"w": (array.shape, array.dtype)})
    with pytest.raises(WireError, match="expected|elements arrived"):
        for i in order:
            assembler.add(chunks[i])
        assembler.result()


def test_assembler_refuses_an_output_array_of_another_layout():
    array = np.arange(10, dtype=np.float32).reshape(2, 5)
    for out in (np.zeros((5, 2), np.float32), np.zeros((2, 5), np.float64), np.zeros((5, 2), np.float32).T):
        assembler = Assembler({"w": (array.shape, array.dtype)}, out={"w": out})
        with pytest.raises(ValueError, match="output array"):
            assembler.add(_small_chunks(array)[0])


def _shard_of(arrays, optimizer, **options):
    """A Shard over copies of `arrays` (name -> array) with optimizer(list of parameters), not served."""
    from distbp.nn import Parameter
    from distbp.ps.server import Shard

    named = {n: Parameter(a.copy()) for n, a in arrays.items()}
    return Shard(named, optimizer(list(named.values())), mode="async", workers=1, **options)


def _push_arrays(shard, grads, chunk_bytes=CHUNK_BYTES):
    chunks = [c for n, g in grads.items() for c in to_chunks(n, g, chunk_bytes=chunk_bytes)]
    return shard.push(0, shard.version, iter(chunks))


@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 40_000, 3_000_000])
def test_shard_steps_pieces_exactly_as_whole_parameters(chunk_bytes):
    # w spans two pieces of CHUNK_BYTES; the other chunk sizes take the path that copies into place
    from distbp.optim import Adam

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((700, 1000), dtype=np.float32), "b": rng.standard_normal(7, dtype=np.float32)}
    shard = _shard_of(arrays, lambda ps: Adam(ps, lr=0.01, weight_decay=0.1))
    assert [len(p) for p in shard.pieces.values()] == [2, 1]
    shard.register(0, shard.signature)
    reference = {n: Tensor(a.copy(), requires_grad=True) for n, a in arrays.items()}
    whole = Adam(list(reference.values()), lr=0.01, weight_decay=0.1)
    for step in range(3):
        grads = {n: rng.standard_normal(a.shape, dtype=np.float32) for n, a in arrays.items()}
        assert _push_arrays(shard, grads, chunk_bytes) == step + 1
        for n, t in reference.items():
            t.grad = Tensor(grads[n])
        whole.step()
        for n, t in reference.items():
            np.testing.assert_array_equal(shard.params[n].data, t.data)
    shard.stop()


def test_a_shard_needs_a_new_optimizer_over_its_own_parameters():
    from distbp.nn import Parameter
    from distbp.optim import SGD
    from distbp.ps.server import Shard

    mine, other = Parameter(np.ones(4, np.float32)), Parameter(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="not this shard's"):
        Shard({"w": mine}, SGD([mine, other], lr=0.1))
    used = SGD([mine], lr=0.1, momentum=0.9)
    mine.grad = Tensor(np.ones(4, np.float32))
    used.step()
    with pytest.raises(ValueError, match="must be new"):
        Shard({"w": mine}, used)


def _numbered(shard, worker_id, version, chunks, sequence, **options):
    """shard.push of push number `sequence`, made under the worker's current registration (a number counts
    only with the registration it was given under, as distbp's client sends it)."""
    return shard.push(worker_id, version, chunks, sequence=sequence, registration=shard.registrations[worker_id],
                      **options)


def _sync_shard_of_two_workers():
    """A sync shard of w = zeros(4) (SGD, lr 1) with workers 0 and 1 registered, and chunks(v): w's
    gradient full of v, as chunks."""
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.mode, shard.expected = "sync", 2
    for wid in (0, 1):
        shard.register(wid, shard.signature)
    return shard, lambda value: list(to_chunks("w", np.full(4, value, np.float32)))


def test_a_repeated_sync_push_counts_once():
    # a client retries a push whose reply was lost (the connection dropped while it waited for the step)
    shard, chunks = _sync_shard_of_two_workers()
    assert shard.push(0, 0, iter(chunks(1.0))) == 0
    assert shard.push(0, 0, iter(chunks(5.0))) == 0  # the retry: no error, not counted
    assert shard.pushes == 1 and shard.version == 0
    assert shard.push(1, 0, iter(chunks(3.0))) == 1
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -2.0, np.float32))  # -(1 + 3) / 2
    shard.stop()


def test_a_numbered_sync_push_retried_after_its_step_is_not_stale():
    # the reply to worker 0's push was lost, and the step happened meanwhile: its retry is answered with
    # the new version, not refused as a stale push (which would make the worker rejoin and skip a step)
    shard, chunks = _sync_shard_of_two_workers()
    assert _numbered(shard, 0, 0, iter(chunks(1.0)), 1) == 0
    assert _numbered(shard, 1, 0, iter(chunks(3.0)), 1) == 1
    assert _numbered(shard, 0, 0, iter(chunks(1.0)), 1) == 1  # the retry
    assert shard.pushes == 2 and shard.version == 1
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -2.0, np.float32))
    shard.stop()


def test_a_retried_push_number_with_an_impossible_version_is_refused():
    # a retry is acknowledged without being applied again, but only one that could have been sent
    shard, chunks = _sync_shard_of_two_workers()
    assert _numbered(shard, 0, 0, iter(chunks(1.0)), 1) == 0
    for bad in (-7, 10**12):
        with pytest.raises(_Refused, match=f"version {bad} is not in") as refused:
            _numbered(shard, 0, bad, iter(chunks(1.0)), 1)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert shard.pushes == 1 and shard.version == 0 and set(shard.pending) == {0}
    shard.stop()


def test_the_sync_mean_of_finite_gradients_near_the_float_limit_stays_finite():
    import warnings

    shard, chunks = _sync_shard_of_two_workers()
    big = float(np.finfo(np.float32).max) * 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way
        shard.push(0, 0, iter(chunks(big)))
        shard.push(1, 0, iter(chunks(big)))
    np.testing.assert_allclose(shard.params["w"].data, -big, rtol=1e-6)  # lr 1: w = 0 - mean
    shard.stop()


def test_a_stopped_sync_shard_takes_no_step_after_its_final_checkpoint(tmp_path):
    # SIGTERM: the server stops taking pushes, then writes its checkpoint; the straggler monitor must not
    # then drop the late worker and step, leaving the shard (and its replies) past the checkpoint
    shard, chunks = _sync_shard_of_two_workers()
    shard.sync_timeout = 0.05
    shard.push(0, 0, iter(chunks(1.0)))  # worker 1 never pushes
    with shard.cond:  # as the server on SIGTERM; the monitor, asleep meanwhile, then waits for the lock
        shard.stop()
        shard.save(tmp_path / "ps.ckpt")
        time.sleep(0.15)  # past the timeout and a monitor round (a big model's save takes longer)
    time.sleep(0.2)
    assert shard.version == 0 and shard.active == {0, 1}
    np.testing.assert_array_equal(shard.params["w"].data, np.zeros(4, np.float32))


def test_a_shard_whose_parameters_diverged_does_not_overwrite_its_checkpoint(tmp_path):
    from distbp.serialization import CheckpointError

    shard, chunks = _sync_shard_of_two_workers()
    path = tmp_path / "ps.ckpt"
    shard.save(path)
    good = path.read_bytes()
    shard.params["w"].data[1] = np.inf  # as a step with a huge learning rate leaves them
    with pytest.raises(CheckpointError, match="not written: param/w holds non-finite values"):
        shard.save(path)
    assert path.read_bytes() == good
    shard.stop()


def test_register_echoes_a_long_setting_cut_short(tmp_path):
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0),
                      settings={"lr": 0.1, "data": "abc"}, setting_keys={"lr", "data"})
    for settings, code in (({"lr": "x" * 20000}, grpc.StatusCode.FAILED_PRECONDITION),
                           ({"data": "y" * 20000}, grpc.StatusCode.FAILED_PRECONDITION),
                           ({f"k{i}": 1 for i in range(5000)}, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(_Refused) as refused:
            shard.register(0, shard.signature, settings)
        assert refused.value.code == code and len(refused.value.message) < 600, refused.value.message
    shard.stop()


def test_a_number_sent_without_a_registration_does_not_swallow_the_workers_own_pushes():
    # another client pushing as worker 0 with registration 0 and sequence 2**64 - 1: every later push of the
    # worker itself was answered OK as "applied once" and dropped
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)
    chunks = lambda value: list(to_chunks("w", np.full(4, value, np.float32)))  # noqa: E731
    assert shard.push(0, 0, iter(chunks(1.0)), sequence=2**64 - 1) == 1  # applied; its number is its own
    assert _numbered(shard, 0, 1, iter(chunks(2.0)), 1) == 2
    assert _numbered(shard, 0, 2, iter(chunks(4.0)), 2) == 3
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -7.0, np.float32))
    shard.stop()


def test_a_client_that_numbers_its_pushes_without_a_registration_still_has_its_retries_count_once():
    # (a client built from the proto alone, leaving registration at 0)
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)
    chunks = lambda value: list(to_chunks("w", np.full(4, value, np.float32)))  # noqa: E731
    assert shard.push(0, 0, iter(chunks(1.0)), sequence=1) == 1
    assert shard.push(0, 0, iter(chunks(1.0)), sequence=1) == 1  # the retry: applied once
    assert shard.push(0, 1, iter(chunks(1.0)), sequence=2) == 2
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -2.0, np.float32))
    shard.stop()


def test_a_sync_push_before_every_worker_joined_is_refused():
    # one worker pushing alone stepped the job three versions on (averaging over one worker), and the
    # second joined at version 3
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.mode, shard.expected, shard.started = "sync", 2, False
    shard.register(0, shard.signature)
    with pytest.raises(_Refused) as err:
        shard.push(0, 0, iter(to_chunks("w", np.ones(4, np.float32))))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "the job has not started: 1 of 2 workers have registered" in err.value.message
    assert shard.version == 0 and shard.pushes == 0
    shard.stop()


def test_a_push_from_a_worker_not_taking_part_is_refused_before_its_stream_is_read():
    # its chunks were held (each a whole message) until the stream ended: memory for as long as it lasted
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    read = []

    def stream():
        read.append(1)
        yield from to_chunks("w", np.ones(4, np.float32))

    with pytest.raises(_Refused, match="worker 7 is not taking part"):
        shard.push(7, 0, stream())
    assert read == []
    shard.stop()


def test_a_numbered_async_push_sent_again_is_applied_once():
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)
    chunks = lambda value: list(to_chunks("w", np.full(4, value, np.float32)))  # noqa: E731
    assert _numbered(shard, 0, 0, iter(chunks(1.0)), 1) == 1
    assert _numbered(shard, 0, 0, iter(chunks(1.0)), 1) == 1  # the retry: not applied again
    assert _numbered(shard, 0, 1, iter(chunks(2.0)), 2) == 2
    assert shard.pushes == 2
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -3.0, np.float32))
    shard.push(0, 2, iter(chunks(4.0)))  # not numbered (another client): always applied
    shard.push(0, 3, iter(chunks(4.0)))
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -11.0, np.float32))
    shard.register(0, shard.signature)  # a rejoining worker numbers its pushes from 1 again
    assert _numbered(shard, 0, 4, iter(chunks(1.0)), 1) == 5
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -12.0, np.float32))
    shard.stop()


def test_an_async_shard_ahead_of_the_step_its_worker_goes_on_from_skips_the_steps_it_applied(caplog):
    # a push that one shard applied and another refused: the worker rejoins and goes on from the fewer
    # steps; the shard that applied the push must not apply that step a second time
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    chunks = lambda value: list(to_chunks("w", np.full(4, value, np.float32)))  # noqa: E731
    shard.register(0, shard.signature)
    for step in range(3):
        assert _numbered(shard, 0, step, iter(chunks(1.0)), step + 1, step=step + 1) == step + 1
    assert shard.register(0, shard.signature)[2] == 3  # the worker rejoins; another shard counts 1 step
    with caplog.at_level("WARNING", logger="distbp.ps"):
        assert _numbered(shard, 0, 3, iter(chunks(1.0)), 1, step=2) == 3  # step 2 again: skipped
        assert _numbered(shard, 0, 3, iter(chunks(1.0)), 1, step=2) == 3  # its retry
        assert _numbered(shard, 0, 3, iter(chunks(1.0)), 2, step=3) == 3
    assert "goes on from step 1 of its run, and this shard has applied its steps up to 3" in caplog.text
    assert len(caplog.records) == 1  # once per rejoin, not per push
    assert _numbered(shard, 0, 3, iter(chunks(2.0)), 3, step=4) == 4
    assert shard.pushes == 4 and shard.steps_done[0] == 4
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -5.0, np.float32))
    with pytest.raises(_Refused) as gap:  # a step past the next one: its retries could not be told apart
        _numbered(shard, 0, 4, iter(chunks(1.0)), 4, step=6)
    assert gap.value.code == grpc.StatusCode.INVALID_ARGUMENT and "step 6 of its run" in gap.value.message
    assert "applied 4 of its pushes" in gap.value.message and shard.pushes == 4
    assert _numbered(shard, 0, 4, iter(chunks(1.0)), 4, step=5) == 5  # the refused number is still free
    assert _numbered(shard, 0, 5, iter(chunks(1.0)), 5) == 6  # no step given: applied, as before
    shard.stop()


def test_a_push_in_flight_when_its_worker_registers_again_is_refused():
    # a worker process dies mid-push and its successor registers with the same id before the old push
    # is applied: the old push (with a high number) must neither count nor make the new pushes look old
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)

    def old_chunks():
        yield from to_chunks("w", np.full(4, 5.0, np.float32))
        shard.register(0, shard.signature)  # the successor joins while the old push is still arriving

    with pytest.raises(_Refused) as err:
        _numbered(shard, 0, 0, old_chunks(), 57)
    # the old process is the one replaced: told to stop (without its registration, FAILED_PRECONDITION)
    assert err.value.code == grpc.StatusCode.ABORTED and "registered again" in err.value.message
    assert _numbered(shard, 0, 0, iter(to_chunks("w", np.ones(4, np.float32))), 1) == 1
    np.testing.assert_array_equal(shard.params["w"].data, np.full(4, -1.0, np.float32))
    shard.stop()


def test_a_push_pull_retried_after_its_reply_was_lost_is_applied_once(monkeypatch):
    # the server applies the push, then the call fails as if the connection dropped: the client retries
    # the same push, which must not be applied a second time
    import distbp.ps.server as server_module

    class LosesTheFirstReply(server_module.Servicer):
        lost = 0

        def PushPull(self, request_iterator, context):
            if not LosesTheFirstReply.lost:
                LosesTheFirstReply.lost += 1
                self._push(request_iterator)
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
            yield from super().PushPull(request_iterator, context)

    monkeypatch.setattr(server_module, "Servicer", LosesTheFirstReply)
    config = make_config({"epochs": 1, "progress": "none", "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                          "schedule": "constant"})
    addresses, (shard,), stop = start_servers(config, 1, 1, mode="async")
    try:
        named = _named(config)
        client = PSClient(addresses, named, retry_seconds=10.0)
        client.register()
        before = {n: p.data.copy() for n, p in shard.params.items()}
        grads = {n: np.full(p.data.shape, 0.25, p.data.dtype) for n, p in named}
        pulled = client.push_pull(grads)
        assert LosesTheFirstReply.lost == 1 and shard.pushes == 1 and shard.version == 1
        for n, value in before.items():
            np.testing.assert_array_equal(pulled[n], value - np.float32(0.5) * np.float32(0.25))
            np.testing.assert_array_equal(shard.params[n].data, pulled[n])
    finally:
        stop()


def _values_of(messages):
    """name -> float32 values of serialized PullReplies (one chunk each), in message order."""
    values = {}
    for m in messages:
        _, chunk = decode_message(m, {1: "version"}, 2)
        values.setdefault(chunk.name, []).append(np.frombuffer(chunk.data, np.float32))
    return {n: np.concatenate(v) for n, v in values.items()}


def test_a_version_is_encoded_once_for_all_its_pulls():
    from distbp.optim import SGD

    arrays = {"w": np.ones((3, 4), np.float32)}
    shard = _shard_of(arrays, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)
    first = list(shard.pull_messages(0, 0, lambda: True))
    again = list(shard.pull_messages(0, 0, lambda: True))
    assert len(first) == len(again) == 1 and again[0] is first[0]  # the same bytes, not encoded twice
    _push_arrays(shard, {"w": np.full((3, 4), 0.5, np.float32)})
    second = list(shard.pull_messages(0, 1, lambda: True))
    assert second[0] is not first[0]
    np.testing.assert_array_equal(_values_of(second)["w"], np.full(12, 0.5, np.float32))
    shard.stop()


def test_a_pull_encodes_a_message_when_it_is_sent_and_keeps_its_version_across_a_step():
    # w is two chunks: the first goes on the wire before the second is encoded; a push that steps the
    # parameters in between does not change what the pull still has to send
    from distbp.optim import SGD

    w = np.arange(700 * 1000, dtype=np.float32).reshape(700, 1000)
    shard = _shard_of({"w": w}, lambda ps: SGD(ps, lr=1.0))
    shard.register(0, shard.signature)
    reader = shard.pull_messages(0, 0, lambda: True)
    head = next(reader)
    assert len(shard._encoded.messages) == 1
    _push_arrays(shard, {"w": np.ones((700, 1000), np.float32)})
    assert shard.version == 1
    np.testing.assert_array_equal(_values_of([head, *reader])["w"], w.reshape(-1))
    np.testing.assert_array_equal(_values_of(shard.pull_messages(0, 1, lambda: True))["w"], w.reshape(-1) - 1)
    shard.stop()


def test_shard_checkpoint_joins_piece_state_and_restores_it(tmp_path):
    from distbp.optim import SGD

    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((700, 1000), dtype=np.float32)}
    grads = [{"w": rng.standard_normal((700, 1000), dtype=np.float32)} for _ in range(4)]

    def make(**options):
        shard = _shard_of(arrays, lambda ps: SGD(ps, lr=0.1, momentum=0.9), **options)
        shard.register(0, shard.signature)
        return shard

    straight = make()
    for g in grads:
        _push_arrays(straight, g)
    path = tmp_path / "shard.safetensors"
    first = make(checkpoint=path, checkpoint_every=2)
    for g in grads[:2]:
        _push_arrays(first, g)
    from distbp.serialization import load_safetensors

    saved, _ = load_safetensors(path)
    assert saved["optim/w/momentum_buffer"].shape == (700, 1000)  # one array per parameter, not per piece
    again = make(checkpoint=path)
    assert again.version == 2
    for g in grads[2:]:
        _push_arrays(again, g)
    np.testing.assert_array_equal(again.params["w"].data, straight.params["w"].data)
    for shard in (straight, first, again):
        shard.stop()


def test_shard_assignment_is_deterministic_and_balanced():
    sizes = {f"p{i}": s for i, s in enumerate([1000, 10, 990, 20, 500, 500, 5])}
    owner = assign_shards(sizes, 3)
    assert owner == assign_shards(dict(reversed(list(sizes.items()))), 3)
    loads = [sum(sizes[n] for n, s in owner.items() if s == k) for k in range(3)]
    assert max(loads) - min(loads) <= 500


# --- training -------------------------------------------------------------------------------------

EQUIV = dict(dataset="synthetic", synthetic_size=2000, hidden=[32], epochs=2, progress="none")


@pytest.mark.parametrize("num_shards", [1, 2])
def test_sync_ps_equals_allreduce_and_single_process(num_shards):
    workers = 2
    common = dict(EQUIV, optimizer="sgd", lr=0.05, momentum=0.9)
    single = Trainer(make_config({**common, "batch_size": 32}))
    single.fit()
    config = make_config({**common, "batch_size": 16})
    reduced = [None, None]

    def allreduce_rank(comm):
        reduced[comm.rank] = Trainer(config, allreduce_step(config, comm))
        reduced[comm.rank].fit()

    run_ranks(2, allreduce_rank)
    addresses, shards, stop = start_servers(config, num_shards, workers, mode="sync")
    try:
        ps_workers = train_workers(config, addresses, workers)
    finally:
        stop()
    assert [t.strategy.rank for t in ps_workers] == [0, 1]
    assert shards[0].version == single.step
    for name, value in params(single).items():
        for trainer in [*ps_workers, *reduced]:
            np.testing.assert_allclose(params(trainer)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_async_training_on_digits_reaches_95_percent():
    config = make_config({"epochs": 10, "progress": "none", "lr": 0.05})
    addresses, shards, stop = start_servers(config, 2, 2, mode="async")
    try:
        workers = train_workers(config, addresses, 2)
        _, accuracy = workers[0].evaluate()
    finally:
        stop()
    assert shards[0].pushes == sum(t.step for t in workers)
    assert accuracy >= 0.95


def test_bounded_staleness_trains():
    config = make_config({"epochs": 6, "progress": "none", "lr": 0.05})
    addresses, shards, stop = start_servers(config, 1, 2, mode="bounded", staleness=1)
    try:
        workers = train_workers(config, addresses, 2)
        _, accuracy = workers[0].evaluate()
    finally:
        stop()
    assert accuracy >= 0.9


def test_bounded_staleness_holds_back_a_worker_that_runs_ahead():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 2, mode="bounded", staleness=1)
    try:
        named = _named(config)
        grads = {n: np.zeros(p.data.shape, p.data.dtype) for n, p in named}
        fast, slow = PSClient(addresses, named), PSClient(addresses, named)
        fast.register()
        slow.register()
        fast.push(grads)
        fast.pull()  # one ahead of the slowest: allowed
        fast.push(grads)
        done = threading.Event()
        threading.Thread(target=lambda: (fast.pull(), done.set()), daemon=True).start()
        assert not done.wait(0.7), "a worker two versions ahead was not held back"
        slow.push(grads)
        assert done.wait(10), "the held-back worker was not released when the slowest caught up"
    finally:
        stop()


def test_a_sync_shard_skips_a_round_it_has_taken_when_its_workers_go_on_from_an_earlier_one(caplog):
    # One shard stopped before the round another took: the workers go on from the fewer rounds, and the shard
    # ahead applied that round's pushes a second time (one version more than the others, no warning)
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 2, mode="sync")
    try:
        named = _named(config)
        grads = {n: np.full(p.data.shape, 0.5, p.data.dtype) for n, p in named}
        clients = [PSClient(addresses, named, retry_seconds=10.0) for _ in range(2)]

        def round_of_both():
            with futures.ThreadPoolExecutor(2) as pool:
                return [f.result(timeout=30) for f in [pool.submit(c.push_pull, grads) for c in clients]]

        for c in clients:
            c.register()
        round_of_both()
        assert shard.version == 1
        after_one = {n: p.data.copy() for n, p in shard.params.items()}
        for c in clients:  # rejoin as from a second shard that is at version 0
            c.register(requested_id=c.worker_id)
            c.steps = 0
        with caplog.at_level("WARNING", logger="distbp.ps"):
            pulled = round_of_both()
        assert shard.version == 1 and all(c.versions == [1] for c in clients)
        assert "this shard has taken 1 rounds: it skips those up to its own" in caplog.text
        for n, value in after_one.items():
            np.testing.assert_array_equal(shard.params[n].data, value)
            for p in pulled:
                np.testing.assert_array_equal(p[n], value)
        round_of_both()  # the next round is taken
        assert shard.version == 2
    finally:
        stop()


def test_a_model_over_4_mb_works_end_to_end():
    config = make_config({"hidden": [2048, 512], "max_steps": 3, "epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 2, 1, mode="sync")
    try:
        (worker,) = train_workers(config, addresses, 1)
    finally:
        stop()
    assert sum(p.data.nbytes for p in worker.model.parameters()) > 4 * 1024 * 1024
    assert shards[0].version == 3
    for name, p in worker.model.named_parameters():
        owner = next(s for s in shards if name in s.params)
        np.testing.assert_array_equal(p.data, owner.params[name].data)


def test_a_dropped_worker_does_not_stop_the_others():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 1, 2, mode="sync", sync_timeout=0.5)
    try:
        quitter = PSClient(addresses, _named(config))
        quitter.register()  # joins, then never pushes (a killed worker)
        (survivor,) = train_workers(config, addresses, 1)
    finally:
        stop()
    assert survivor.step == survivor.steps_per_epoch
    assert shards[0].version == survivor.step and shards[0].active == {survivor.strategy.rank}


# --- security and bad input ---------------------------------------------------------------------


def _named(config):
    from distbp.autograd import manual_seed
    from distbp.train import build_data, build_model

    manual_seed(config.seed)
    return list(build_model(config, build_data(config)).named_parameters())


def test_token_is_checked_on_every_call():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 1, 1, token="s3cret")
    try:
        for token in (None, "wrong"):
            with pytest.raises(PSError, match="UNAUTHENTICATED"):
                PSClient(addresses, _named(config), token=token, retry_seconds=0).register()
        client = PSClient(addresses, _named(config), token="s3cret")
        assert client.register().worker_id == 0
        grads = {n: np.zeros_like(p.data) for n, p in _named(config)}
        intruder = PSClient(addresses, _named(config), token="wrong", retry_seconds=0)
        intruder.worker_id = 0  # as if it had registered: every method must still refuse it
        for call in (intruder.status, intruder.pull, lambda: intruder.push(grads), lambda: intruder.push_pull(grads)):
            with pytest.raises(PSError, match="UNAUTHENTICATED"):
                call()
        assert shards[0].pushes == 0
        with grpc.insecure_channel(addresses[0]) as channel:  # health checks stay open
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop()


def test_a_call_carrying_the_token_header_twice_is_refused():
    # only the last of two counted: a wrong first header and a right last one were let in
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config, 1, 1, token="s3cret")
    try:
        with grpc.insecure_channel(addresses[0]) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            for headers in ([("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")],
                            [("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")]):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Status(ps_pb2.StatusRequest(), metadata=headers)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Status(ps_pb2.StatusRequest(), metadata=[("authorization", "Bearer s3cret")]).num_shards == 1
    finally:
        stop()


def test_malformed_register_and_pull_requests_are_invalid_arguments_named():
    # gRPC's own deserializer answered INTERNAL "Exception deserializing request!" and logged a traceback
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config, 1, 1)
    try:
        with grpc.insecure_channel(addresses[0]) as channel:
            for method, name in (("Register", "RegisterRequest"), ("Status", "StatusRequest")):
                call = channel.unary_unary(f"/distbp.ps.v1.ParameterServer/{method}")
                with pytest.raises(grpc.RpcError) as err:
                    call(b"\xff\xff\xff")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"a malformed {name}" in err.value.details()
            pull = channel.unary_stream("/distbp.ps.v1.ParameterServer/Pull")
            with pytest.raises(grpc.RpcError) as err:
                list(pull(b"\x0a\x05ab"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "a malformed PullRequest" in err.value.details()
        with pytest.raises(PSError, match="INVALID_ARGUMENT: worker id -7 is neither an id nor -1"):
            PSClient(addresses, _named(config)).register(requested_id=-7)
    finally:
        stop()


def _certificates(tmp_path):
    pytest.importorskip("cryptography", reason="the TLS tests make certificates with cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(name, issuer_key=None, issuer=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("distbp test CA", ca=True)
    files = {}
    for role in ("server", "client"):
        key, cert = make(role, ca_key, ca_cert.subject)
        files[f"{role}_key"] = tmp_path / f"{role}.key"
        files[f"{role}_cert"] = tmp_path / f"{role}.pem"
        files[f"{role}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = tmp_path / "ca.pem"
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def test_tls_refuses_a_plaintext_client_and_serves_a_verified_one(tmp_path):
    files = _certificates(tmp_path)
    config = make_config({"epochs": 1, "progress": "none"})
    tls = dict(cert=files["server_cert"], key=files["server_key"])
    addresses, shards, stop = start_servers(config, 1, 1, tls=tls)
    try:
        with pytest.raises(PSError, match="UNAVAILABLE"):
            PSClient(addresses, _named(config), retry_seconds=0).register()
        client = PSClient(addresses, _named(config), tls_ca=files["ca"])
        assert client.register().worker_id == 0
    finally:
        stop()


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    files = _certificates(tmp_path)
    config = make_config({"epochs": 1, "progress": "none"})
    tls = dict(cert=files["server_cert"], key=files["server_key"], client_ca=files["ca"])
    addresses, shards, stop = start_servers(config, 1, 1, tls=tls)
    try:
        with pytest.raises(PSError, match="UNAVAILABLE"):
            PSClient(addresses, _named(config), tls_ca=files["ca"], retry_seconds=0).register()
        client = PSClient(addresses, _named(config), tls_ca=files["ca"], tls_cert=files["client_cert"],
                          tls_key=files["client_key"])
        assert client.register().worker_id == 0
    finally:
        stop()


def _push(stub, worker_id, version, chunks, sequence=0, registration=0):
    return stub.Push(iter([ps_pb2.PushRequest(worker_id=worker_id, version=version, chunk=c, sequence=sequence,
                                              registration=registration) for c in chunks]))


def _grad_chunks(shard, tweak=None):
    chunks = []
    for name, p in shard.params.items():
        g = np.full(p.data.shape, 0.01, p.data.dtype)
        chunks += list(to_chunks(name, g))
    return tweak(chunks) if tweak else chunks


def _bad(kind):
    def tweak(chunks):
        c = chunks[0]
        if kind == "unknown-name":
            c.name = "nope.weight"
        elif kind == "wrong-dtype":
            c.dtype = "float64"
        elif kind == "wrong-shape":
            c.shape[0] += 1
        elif kind == "non-finite":
            arr = np.frombuffer(c.data, np.float32).copy()
            arr[0] = np.nan
            c.data = arr.tobytes()
        elif kind == "missing-tensor":
            return chunks[1:]
        elif kind == "short-data":
            c.data = c.data[:-4]
        elif kind == "ragged-bytes":
            c.data = c.data[:-1]
        elif kind == "offset-outside":
            c.offset = 10**9
        return chunks

    return tweak


@pytest.mark.parametrize("kind", ["unknown-name", "wrong-dtype", "wrong-shape", "non-finite", "missing-tensor",
                                  "short-data", "ragged-bytes", "offset-outside", "bad-version", "unregistered"])
def test_each_bad_push_is_rejected_and_leaves_the_state_untouched(kind):
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 1, mode="async")
    try:
        client = PSClient(addresses, _named(config))
        wid = client.register().worker_id
        before = {n: p.data.copy() for n, p in shard.params.items()}
        stub = client.stubs[0]
        version = 7 if kind == "bad-version" else 0
        worker = 5 if kind == "unregistered" else wid
        chunks = _grad_chunks(shard, None if kind in ("bad-version", "unregistered") else _bad(kind))
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, worker, version, chunks)
        expected = grpc.StatusCode.FAILED_PRECONDITION if kind == "unregistered" else grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.code() == expected, err.value.details()
        assert err.value.details()
        assert shard.version == 0 and shard.pushes == 0
        for name, value in before.items():
            np.testing.assert_array_equal(shard.params[name].data, value)
        _push(stub, wid, 0, _grad_chunks(shard))  # and a good push still works
        assert shard.version == 1
    finally:
        stop()


def test_push_numbers_travel_as_uint64_from_any_client():
    # a client in another language may number its pushes from anywhere in uint64: read as a negative
    # int64, the first of them would pass for a retry and be dropped
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 1, mode="async")
    try:
        client = PSClient(addresses, _named(config))
        wid = client.register().worker_id
        stub = client.stubs[0]
        reg = client.registrations[0]
        assert _push(stub, wid, 0, _grad_chunks(shard), sequence=2**63 + 1, registration=reg).version == 1
        assert _push(stub, wid, 1, _grad_chunks(shard), sequence=2**63 + 1, registration=reg).version == 1  # retry
        assert _push(stub, wid, 1, _grad_chunks(shard), sequence=2**64 - 1, registration=reg).version == 2
        assert shard.pushes == 2
    finally:
        stop()


def test_push_pull_refuses_a_bad_push_and_returns_the_stepped_parameters():
    config = make_config({"epochs": 1, "progress": "none", "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                          "schedule": "constant"})
    addresses, (shard,), stop = start_servers(config, 1, 1, mode="async")
    try:
        named = _named(config)
        client = PSClient(addresses, named)
        client.register()
        before = {n: p.data.copy() for n, p in shard.params.items()}
        bad = {n: np.full(p.data.shape, np.inf, p.data.dtype) for n, p in named}
        with pytest.raises(PSError, match="INVALID_ARGUMENT.*non-finite"):
            client.push_pull(bad)
        assert shard.version == 0 and all(np.array_equal(shard.params[n].data, v) for n, v in before.items())
        grads = {n: np.full(p.data.shape, 0.25, p.data.dtype) for n, p in named}
        out = {n: np.empty_like(p.data) for n, p in named}
        got = client.push_pull(grads, out=out)
        assert client.versions == [1]
        for n, value in before.items():
            np.testing.assert_array_equal(got[n], value - np.float32(0.5 * 0.25))
            assert np.shares_memory(got[n], out[n])
    finally:
        stop()


def test_a_worker_of_another_model_is_refused():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 1, 1)
    try:
        other = _named(make_config({"epochs": 1, "hidden": [64]}))
        with pytest.raises(PSError, match="model differs"):
            PSClient(addresses, other).register()
    finally:
        stop()


def test_concurrent_async_pushes_lose_no_update():
    config = make_config({"epochs": 1, "progress": "none", "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                          "schedule": "constant"})
    workers, pushes = 4, 25
    addresses, shards, stop = start_servers(config, 2, workers, mode="async")
    try:
        named = _named(config)
        for shard in shards:  # start from zero: every partial sum below is then exact in float32
            for p in shard.params.values():
                p.data[...] = 0
        start = {n: np.zeros(p.data.shape, p.data.dtype) for n, p in named}
        rng = np.random.default_rng(0)
        grads = [[{n: (rng.integers(-4, 5, p.data.shape) / 64).astype(np.float32) for n, p in named}
                  for _ in range(pushes)] for _ in range(workers)]

        def body(w):
            client = PSClient(addresses, named)
            client.register()
            for g in grads[w]:
                client.push(g)
                client.pull()

        threads = [threading.Thread(target=body, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(s.pushes for s in shards) == workers * pushes * 2  # every push reached both shards
        for name, value in start.items():
            total = sum(g[name] for per_worker in grads for g in per_worker)
            owner = next(s for s in shards if name in s.params)
            # gradients are multiples of 1/64 and lr a power of two: every float32 sum is exact
            np.testing.assert_array_equal(owner.params[name].data, value - 0.5 * total)
    finally:
        stop()


# --- faults with real server processes --------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server_process(port, ckpt, extra=()):
    command = [sys.executable, "-m", "distbp", "ps", "serve", "--port", str(port), "--checkpoint-path", str(ckpt),
               "--checkpoint-every-versions", "20", *(extra if "--workers" in extra else ["--workers", "1", *extra])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "serving on" in line, process.stderr.read()
    return process


def test_a_worker_other_than_worker_0_says_that_it_writes_no_metrics_or_trace(tmp_path):
    # it printed nothing and wrote nothing, with exit status 0
    config = make_config({"epochs": 1, "max_steps": 2, "progress": "none", "metrics": str(tmp_path / "m.jsonl")})
    addresses, _, stop = start_servers(config, workers=2, mode="async")
    streams = [io.StringIO(), io.StringIO()]
    try:
        trainers = [Trainer(config, PSStep(addresses, requested_id=i), stream=streams[i]) for i in range(2)]
        for t in trainers:
            t.fit()
    finally:
        stop()
    assert streams[0].getvalue() == ""
    assert streams[1].getvalue() == ("worker 1: --metrics is written by worker 0 alone, as its progress is shown; "
                                     "this worker writes none\n")


def test_a_server_names_the_workers_options_it_ignores(tmp_path):
    server = _start_server_process(_free_port(), tmp_path / "ps.ckpt",
                                   ["--metrics", str(tmp_path / "m.jsonl"), "--trace", str(tmp_path / "t.json")])
    server.terminate()
    _, err = server.communicate(timeout=30)
    assert "options of the workers, not of a server, ignored here: --trace, --metrics" in err, err


def test_the_token_can_come_from_the_environment_for_server_and_worker(tmp_path, monkeypatch):
    # a token on the command line is visible to every user of the machine in `ps`
    port = _free_port()
    command = [sys.executable, "-m", "distbp", "ps", "serve", "--port", str(port), "--workers", "1", "--epochs", "1",
               "--max-steps", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DISTBP_PS_TOKEN": "from-the-environment"})
    try:
        assert "serving on" in server.stdout.readline(), server.stderr.read()
        config = make_config({"epochs": 1, "progress": "none"})
        with pytest.raises(PSError, match="UNAUTHENTICATED"):
            PSClient([f"127.0.0.1:{port}"], _named(config)).register()
        monkeypatch.setenv("DISTBP_PS_TOKEN", "from-the-environment")
        from distbp.train.launch import run

        summary = run(replace(config, backend="ps", ps=f"127.0.0.1:{port}", max_steps=2))
        assert summary["steps"] == 2
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_a_server_open_beyond_this_machine_without_token_or_tls_warns(tmp_path):
    server = subprocess.Popen([sys.executable, "-m", "distbp", "ps", "serve", "--host", "0.0.0.0", "--port",
                               str(_free_port()), "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={k: v for k, v in os.environ.items() if k != "DISTBP_PS_TOKEN"})
    assert "serving on" in server.stdout.readline(), server.stderr.read()
    server.terminate()
    _, err = server.communicate(timeout=30)
    assert "listening on 0.0.0.0 with neither a token nor TLS: anyone who can reach the port" in err, err


@pytest.mark.parametrize("workers, mode", [(1, "sync"), (2, "sync"), (2, "async")])
def test_killed_and_restarted_server_training_completes(tmp_path, workers, mode):
    # with 2 sync workers, one is usually waiting inside its PushPull call for the other when the server dies
    port, ckpt = _free_port(), tmp_path / "ps.ckpt"
    options = ["--epochs", "6", "--progress", "none", "--workers", str(workers), "--mode", mode]
    server = _start_server_process(port, ckpt, options)
    config = make_config({"epochs": 6, "progress": "none", "ps_retry_seconds": 60.0})
    results = {}

    def worker(i):
        trainer = Trainer(config, PSStep([f"127.0.0.1:{port}"], retry_seconds=60.0))
        results[i] = trainer.fit()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        # killed a few versions past a checkpoint (written every 20): those versions are lost
        watcher = PSClient([f"127.0.0.1:{port}"], _named(config), retry_seconds=10.0)
        deadline = time.monotonic() + 60
        while not (ckpt.exists() and watcher.status()[0].version % 20 >= 4) and time.monotonic() < deadline:
            time.sleep(0.01)
        watcher.close()
        assert ckpt.exists(), "the server wrote no checkpoint"
        server.send_signal(signal.SIGKILL)  # a crash: the last periodic checkpoint is all that survives
        server.wait(10)
        time.sleep(0.5)
        server = _start_server_process(port, ckpt, options)
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert "restored version" in err
    assert len(results) == workers
    assert all(summary["test_accuracy"] >= 0.95 for summary in results.values()), results
    # the workers took up the run where the restored server had it, so the steps it lost were taken
    # again: every step of the schedule was applied once (sync: one version each; async: one per worker)
    steps = results[0]["steps"]
    assert f"stopped at version {steps if mode == 'sync' else workers * steps}" in out, out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_writes_a_checkpoint_and_a_restarted_job_resumes_at_its_version(tmp_path, mode):
    port, ckpt = _free_port(), tmp_path / "ps.ckpt"
    server = _start_server_process(port, ckpt, ["--epochs", "1", "--mode", mode])
    metrics = tmp_path / "m.jsonl"
    config = make_config({"epochs": 1, "progress": "none", "max_steps": 5, "metrics": str(metrics)})
    Trainer(config, PSStep([f"127.0.0.1:{port}"])).fit()
    server.send_signal(signal.SIGTERM)
    out, _ = server.communicate(timeout=30)
    assert "stopped at version 5" in out and ckpt.exists()
    server = _start_server_process(port, ckpt, ["--epochs", "1", "--mode", mode])
    try:
        status = PSClient([f"127.0.0.1:{port}"], _named(config)).status()[0]
        assert status.version == 5
        # the job started again: its worker takes up the run where it was, not at step 0 (which would replay
        # the first batches and take 5 steps past the end of the schedule): sync, the version; async, the
        # pushes of its worker id, which the checkpoint keeps
        rerun = Trainer(make_config({"epochs": 1, "progress": "none", "metrics": str(metrics)}),
                        PSStep([f"127.0.0.1:{port}"]))
        summary = rerun.fit()
        assert summary["steps"] == rerun.steps_per_epoch
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert f"stopped at version {rerun.steps_per_epoch}" in out
    # the run's metrics go on in the same file
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [5, rerun.steps_per_epoch]


def test_a_final_checkpoint_that_cannot_be_written_names_the_version_lost_and_the_server_stops(tmp_path):
    # the save raised before the gRPC server was stopped: the process ended under live calls, and a worker
    # waiting in one got CANCELLED (which it does not retry) instead of the UNAVAILABLE of any stop
    port, folder = _free_port(), tmp_path / "d"
    server = _start_server_process(port, folder / "ps.ckpt", ["--epochs", "1", "--mode", "async"])
    Trainer(make_config({"epochs": 1, "progress": "none", "max_steps": 3}), PSStep([f"127.0.0.1:{port}"])).fit()
    assert not folder.exists()  # (made when a checkpoint is first written: none was due yet)
    folder.write_text("a file where the checkpoint's folder would be")
    server.send_signal(signal.SIGTERM)
    out, err = server.communicate(timeout=30)
    assert server.returncode == 2, err
    assert "shard 0 stopped at version 3, which its checkpoint could not keep" in out, out
    assert "Traceback" not in err, err


@pytest.mark.parametrize("mode", ["async", "bounded"])
def test_each_async_worker_id_takes_up_its_own_run_after_a_restore(tmp_path, mode):
    # a shard's version counts every worker's pushes; each worker's own count is what it resumes from
    config = make_config({"epochs": 1, "progress": "none"})
    shard = build_shard(config, 0, 1, 2, mode=mode, staleness=5)
    for wid in (0, 1):
        shard.register(wid, shard.signature)
    for wid in (0, 0, 1, 0):
        shard.push(wid, shard.version, iter(_grad_chunks(shard)))
    shard.save(tmp_path / "ps.ckpt")
    shard.stop()
    restored = build_shard(config, 0, 1, 2, mode=mode, staleness=5, checkpoint=str(tmp_path / "ps.ckpt"))
    try:
        assert restored.version == 4
        assert [restored.register(wid, restored.signature)[2] for wid in (1, 0)] == [1, 3]
    finally:
        restored.stop()


def _edit_ps_checkpoint(path, change):
    from distbp.serialization import load_safetensors, save_safetensors

    arrays, metadata = load_safetensors(path)
    meta = json.loads(metadata["distbp-ps"])
    change(meta)
    save_safetensors(path, arrays, {"distbp-ps": json.dumps(meta)})


@pytest.mark.parametrize("change, words", [
    (lambda meta: meta.__setitem__("mode", 42), "mode 42 is not one of"),
    (lambda meta: meta.__setitem__("schedule", None), "version 3 without the schedule's state"),
    (lambda meta: meta.pop("schedule"), "version 3 without the schedule's state"),
    (lambda meta: meta["schedule"].__setitem__("base_lrs", [1e6]), r"base rates are \[1000000.0\]"),
], ids=["mode", "schedule-null", "schedule-missing", "base-rate"])
def test_a_damaged_parameter_server_checkpoint_is_refused_not_restored(tmp_path, change, words):
    from distbp.serialization import CheckpointError

    config = make_config({"epochs": 1, "progress": "none"})
    shard = build_shard(config, 0, 1, 1, mode="async")
    shard.register(0, shard.signature)
    for _ in range(3):
        shard.push(0, shard.version, iter(_grad_chunks(shard)))
    path = tmp_path / "ps.ckpt"
    shard.save(path)
    shard.stop()
    _edit_ps_checkpoint(path, change)
    with pytest.raises(CheckpointError, match=words):
        build_shard(config, 0, 1, 1, mode="async", checkpoint=str(path))


def _async_checkpoint(tmp_path, every=0, pushes=(0, 0, 1, 0), mode="async"):
    config = make_config({"epochs": 1, "progress": "none"})
    path = tmp_path / "ps.ckpt"
    shard = build_shard(config, 0, 1, 2, mode=mode, staleness=5, checkpoint=str(path) if every else None,
                        checkpoint_every=every)
    for wid in (0, 1):
        shard.register(wid, shard.signature)
    for wid in pushes:
        shard.push(wid, shard.version, iter(_grad_chunks(shard)))
    if not every:
        shard.save(path)
    shard.stop()
    return config, path


def _edit_checkpoint_meta(path, change):
    """Pass the checkpoint's metadata through change(meta), dropping the checksum distbp writes (as another
    program would write the file): the checks behind the checksum are the ones tested."""
    import struct

    from distbp.serialization import CHECKSUM_KEY

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"][CHECKSUM_KEY]
    meta = json.loads(header["__metadata__"]["distbp-ps"])
    change(meta)
    header["__metadata__"]["distbp-ps"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_a_periodic_checkpoint_counts_the_push_that_wrote_it():
    # the step of the 4th push writes the checkpoint: its count must already be in it
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config, path = _async_checkpoint(Path(tmp), every=4, pushes=(0, 1, 0, 1))
        restored = build_shard(config, 0, 1, 2, mode="async", checkpoint=str(path))
        try:
            assert restored.version == 4 and restored.steps_done == {0: 2, 1: 2}
        finally:
            restored.stop()


@pytest.mark.parametrize("saved,now", [("async", "sync"), ("sync", "async"), ("bounded", "sync")])
def test_a_checkpoint_of_another_kind_of_mode_is_refused(tmp_path, saved, now):
    from distbp.serialization import CheckpointError

    config, path = _async_checkpoint(tmp_path, mode=saved, pushes=() if saved == "sync" else (0, 1))
    with pytest.raises(CheckpointError, match=f"checkpoint of a {saved} server, this one is {now}"):
        build_shard(config, 0, 1, 2, mode=now, checkpoint=str(path))


def test_a_checkpoint_of_a_run_with_other_settings_or_workers_is_refused(tmp_path):
    # its optimizer state and schedule (the learning rate) would silently replace the server's own
    from distbp.serialization import CheckpointError

    config, path = _async_checkpoint(tmp_path)  # 2 workers
    other = make_config({"epochs": 1, "progress": "none", "lr": config.lr * 5})
    with pytest.raises(CheckpointError, match=f"written with lr = {config.lr!r}, this server has {other.lr!r}"):
        build_shard(other, 0, 1, 2, mode="async", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="written by a server of 2 workers, this one has 3"):
        build_shard(config, 0, 1, 3, mode="async", checkpoint=str(path))
    adam = make_config({"epochs": 1, "progress": "none", "optimizer": "adam", "lr": config.lr})
    with pytest.raises(CheckpointError, match="written with optimizer = 'sgd', this server has 'adam'"):
        build_shard(adam, 0, 1, 2, mode="async", checkpoint=str(path))
    longer = make_config({"epochs": 3, "progress": "none"})  # a longer run may go on from it
    build_shard(longer, 0, 1, 2, mode="async", checkpoint=str(path)).stop()


@pytest.mark.parametrize("steps_done", [{"0": 2**63, "1": 1}, {"7": 3, "0": 1}, {"0": 1000}, {"\u0661": 4},
                                        {"1": 1, "01": 3}, {"0": True, "1": 3}, {"0": -1, "1": 5}, {"0": 1, "1": 1}])
def test_damaged_push_counts_in_a_checkpoint_are_refused(tmp_path, steps_done):
    from distbp.serialization import CheckpointError

    config, path = _async_checkpoint(tmp_path)  # version 4
    _edit_checkpoint_meta(path, lambda meta: meta.update(steps_done=steps_done))
    with pytest.raises(CheckpointError, match="push counts adding up to the version 4"):
        build_shard(config, 0, 1, 2, mode="async", checkpoint=str(path))


def test_a_checkpoint_without_push_counts_shares_the_version_out(tmp_path):
    from distbp.serialization import CheckpointError

    def chunks(shard):
        return iter([c for n, p in shard.params.items() for c in to_chunks(n, np.zeros_like(p.data))])

    config, path = _async_checkpoint(tmp_path, pushes=(0, 1, 0))  # version 3, worker 1 made 1 push
    _edit_checkpoint_meta(path, lambda meta: meta.pop("steps_done"))
    restored = build_shard(config, 0, 1, 2, mode="async", checkpoint=str(path))
    try:
        # shared out so that they add up to the version, or the shard's own checkpoints could not be restored
        assert [restored.register(w, restored.signature)[2] for w in (0, 1)] == [2, 1]
        restored.steps_done = {0: 1, 1: 2}  # the guess is wrong now: worker 1 made only 1 of the 3 pushes
        # a step a guessed count covers is applied, not skipped as one this shard has (which would lose it)
        assert _numbered(restored, 1, 3, chunks(restored), 1, step=2) == 4
        restored.save(path)
    finally:
        restored.stop()
    again = build_shard(config, 0, 1, 2, mode="async", checkpoint=str(path))
    try:
        assert again.steps_guessed and again.steps_done == {0: 1, 1: 3}  # still estimates after a restart
        again.register(1, again.signature)
        assert _numbered(again, 1, 4, chunks(again), 1, step=3) == 5
    finally:
        again.stop()
    _edit_checkpoint_meta(path, lambda meta: meta.update(steps_guessed="yes"))
    with pytest.raises(CheckpointError, match="steps_guessed 'yes' is not true or false"):
        build_shard(config, 0, 1, 2, mode="async", checkpoint=str(path))


def test_the_one_machine_cluster_script_trains(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())}
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "2", "--mode", "sync", "--",
                           "--epochs", "1", "--metrics", str(tmp_path / "m.jsonl")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "stopped at version 23" in done.stdout  # 1,438 digits over 2 workers of 32
    assert (tmp_path / "m.jsonl").read_text().count("test_accuracy") == 1
    # the worker whose progress is shown is worker 0, the one that reports (whichever registers first)
    assert done.stdout.count("done: 23 steps") == 1, done.stdout


def test_shards_of_a_cluster_checkpoint_to_files_of_their_own_and_pass_the_token_on(tmp_path):
    # a path given once (with '=' too, which the script did not rename) was one file that the shards wrote
    # over each other's; '--token=T' did not reach the workers
    env = {**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())}
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "2", "1", f"--checkpoint-path={tmp_path}/ck",
                           "--token=abc", "--", "--epochs", "1", "--max-steps", "3"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.shard0", "ck.shard1"]
    assert f"written to {tmp_path}/ck.shard1" in done.stderr + done.stdout


def test_the_cluster_script_keeps_the_token_off_the_servers_command_lines(tmp_path):
    # the servers were given '--token T', which every user of the machine reads in `ps`; the workers already
    # had it in DISTBP_PS_TOKEN
    log = tmp_path / "started"
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nprintf "%s|%s\\n" "${{DISTBP_PS_TOKEN:-}}" "$*" >> {log}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "BASE_PORT": str(_free_port())}
    env.pop("DISTBP_PS_TOKEN", None)
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "2", "1", "--token", "s3cret", "--",
                           "--epochs", "1", "--max-steps", "1", "--progress", "none"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    started = [line.split("|", 1) for line in log.read_text().splitlines()]
    assert sorted(" ps serve " in f" {args} " for _, args in started) == [False, True, True]
    assert all(token == "s3cret" and "s3cret" not in args for token, args in started), started


def test_a_shards_file_named_as_for_one_shard_is_refused_not_started_over(tmp_path):
    from distbp.train.config import ConfigError
    from distbp.train.ps_service import shard_checkpoint_path

    assert shard_checkpoint_path(str(tmp_path / "ck"), 0, 1) == str(tmp_path / "ck")
    assert shard_checkpoint_path(str(tmp_path / "ck"), 1, 2) == str(tmp_path / "ck.shard1")
    (tmp_path / "ck").write_bytes(b"a checkpoint written before shards named their files")
    with pytest.raises(ConfigError, match=r"there is a file at .*ck, but shard 1 of 2 checkpoints to .*ck.shard1"):
        shard_checkpoint_path(str(tmp_path / "ck"), 1, 2)


def test_the_cluster_script_refuses_tls_servers_without_a_ca_for_the_workers():
    # the workers retried a server they could not talk to for a minute, calling it unavailable
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1", "--tls-cert", "c.pem",
                           "--tls-key", "k.pem", "--", "--epochs", "1"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "give the workers the CA that signed it" in done.stderr
    # a CA in the workers' config file is theirs too: the servers start (and refuse the missing files)
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1", "--tls-cert", "c.pem",
                           "--tls-key", "k.pem", "--", "--config", "w.toml"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())})
    assert "give the workers the CA" not in done.stderr and "config file w.toml does not exist" in done.stderr


@pytest.mark.parametrize("training", [["--ps-tls-ca", "ca.pem"], ["--ps-tls-ca", "ca.pem", "--ps-tls-cert=w.pem"]],
                         ids=["neither", "no-key"])
def test_the_cluster_script_refuses_servers_requiring_client_certificates_without_the_workers_own(training):
    # the workers retried for a minute, then failed with "Socket closed"
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1", "--tls-cert", "c.pem",
                           "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--", "--epochs", "1", *training],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())})
    assert done.returncode == 2 and "the servers require client certificates (--tls-client-ca)" in done.stderr, \
        done.stderr


def test_a_restarted_worker_rejoins_with_its_id_and_the_current_parameters():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 2, mode="async")
    try:
        named = _named(config)
        grads = {n: np.full(p.data.shape, 0.1, p.data.dtype) for n, p in named}
        a, b = PSClient(addresses, named), PSClient(addresses, named)
        a.register()
        b.register()
        a.push(grads)
        with pytest.raises(PSError, match="taken.*--ps-worker-id"):
            PSClient(addresses, named).register()  # every id is in use
        again = PSClient(addresses, named)  # worker b restarted
        assert again.register(requested_id=b.worker_id).worker_id == b.worker_id
        current = again.pull()
        for name, p in shard.params.items():
            np.testing.assert_array_equal(current[name], p.data)
        assert again.versions == [1]
    finally:
        stop()


class _DroppedOnce(PSStep):
    """A worker whose shards drop it once, just before its push of step `at` (as a bounded or sync server
    drops a worker that held the others up): that push is refused and the worker rejoins."""

    def __init__(self, addresses, shards, at):
        super().__init__(addresses)
        self.shards, self.at, self.steps_seen = shards, at, 0  # shards: those that drop it

    def apply(self, model, optimizer):
        self.steps_seen += 1
        if self.steps_seen == self.at + 1:
            for shard in self.shards:
                with shard.cond:
                    shard.active.discard(self.rank)
        return super().apply(model, optimizer)


@pytest.mark.parametrize("mode", ["async", "bounded"])
@pytest.mark.parametrize("dropped_by", [(0, 1), (1,)])
def test_a_worker_refused_mid_run_goes_on_from_the_step_its_servers_count(mode, dropped_by):
    # the refused step is not applied, so it is not done: the worker takes it again, and when its run ends
    # the servers count every one of its steps (before, the worker counted the refused step and ended one
    # short on the servers: in bounded mode a finished worker then went on pacing the others). Refused by
    # one shard only, the step is applied on the other, which must not apply it again when it is retaken.
    config = make_config({"epochs": 1, "progress": "none", "max_steps": 12})
    addresses, shards, stop = start_servers(config, 2, 1, mode=mode)
    try:
        trainer = Trainer(config, _DroppedOnce(addresses, [shards[i] for i in dropped_by], at=5))
        summary = trainer.fit()
        assert summary["steps"] == 12
        assert trainer.strategy.steps_seen == 13  # the refused step, taken again
        assert [shard.steps_done[0] for shard in shards] == [12, 12]
        assert [shard.version for shard in shards] == [12, 12]
        assert [shard.pushes for shard in shards] == [12, 12]
    finally:
        stop()


def test_a_worker_refused_mid_trace_labels_its_spans_with_the_steps_of_its_run(tmp_path):
    # the refused step 6 is taken again: spans are labelled by the step of the run, not the count traced
    trace = tmp_path / "t.json"
    config = make_config({"epochs": 1, "progress": "none", "max_steps": 12, "trace": str(trace)})
    addresses, shards, stop = start_servers(config, 1, 1, mode="async")
    try:
        Trainer(config, _DroppedOnce(addresses, shards, at=5)).fit()
    finally:
        stop()
    pushes = [e["args"]["step"] for e in json.loads(trace.read_text())["traceEvents"]
              if e["ph"] == "X" and e["name"] == "push + pull"]
    assert pushes == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12], pushes  # (7..13 counted the refused one)


def test_a_worker_resumed_from_its_checkpoint_goes_on_where_its_servers_have_its_run(tmp_path):
    # its checkpoint (step 10) is older than the servers' count (14 pushes): the servers hold the parameters,
    # so their count wins; going on at 10 applied steps 10-13 twice (27 pushes for a run of 23)
    def config(resume):
        return make_config({"epochs": 1, "batch_size": 64, "progress": "plain", "checkpoint_every": 5,
                            "checkpoint": str(tmp_path / "w.ckpt"), "resume": resume})

    class DiesAtStep14(PSStep):
        calls = 0

        def apply(self, model, optimizer):
            self.calls += 1
            if self.calls == 15:
                raise RuntimeError("killed")
            return super().apply(model, optimizer)

    addresses, (shard,), stop = start_servers(config(False), 1, 1, mode="async")
    try:
        first = Trainer(config(False), DiesAtStep14(addresses))
        with pytest.raises(RuntimeError, match="killed"):
            first.fit()
        first.strategy.close()
        assert shard.steps_done[0] == 14
        stream = io.StringIO()
        again = Trainer(config(True), PSStep(addresses, requested_id=0), stream=stream)
        summary = again.fit()
        assert summary["steps"] == again.total_steps == 23
        assert shard.steps_done[0] == 23
        assert "the servers have this worker's run at step 14 (its checkpoint is at step 10)" in stream.getvalue()
    finally:
        stop()


def test_shards_far_apart_on_a_workers_run_are_named_in_a_warning(caplog):
    # one shard restored from an older checkpoint than the other: the worker goes on from the fewest steps,
    # and the shard ahead skips the steps between (async); a step apart is usual (one stepped first)
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 2, 1, mode="async")
    try:
        for shard, done in zip(shards, (7, 8)):
            shard.steps_done[0] = done
        client = PSClient(addresses, _named(config))
        with caplog.at_level("WARNING", logger="distbp.ps"):
            client.register(requested_id=0)
        assert client.steps == 7 and not caplog.records
        shards[1].steps_done[0] = 12
        with caplog.at_level("WARNING", logger="distbp.ps"):
            client.register(requested_id=0)
        assert client.steps == 7
        assert "the shards count [7, 12] steps of its run: it goes on from step 7" in caplog.text
        assert "skip them" in caplog.text  # async: the shard ahead does not apply those steps again
        client.close()
    finally:
        stop()


def test_async_shards_restored_from_different_checkpoints_each_apply_every_step_once(tmp_path):
    # shard 0 restored from an older checkpoint (step 7) than shard 1 (step 12): the worker retakes steps
    # 8-12, which only shard 0 lacks; shard 1 skips them, and the run ends with every step applied once on
    # each shard (before, shard 1 applied steps 8-12 again: 25 pushes for a run of 20)
    config = make_config({"epochs": 1, "progress": "none", "max_steps": 20})
    paths = [tmp_path / f"shard{s}.ckpt" for s in range(2)]
    addresses, shards, stop = start_servers(config, 2, 1, mode="async")
    try:
        client = PSClient(addresses, _named(config))
        client.register()
        grads = {n: np.full(p.data.shape, 1e-3, p.data.dtype) for n, p in _named(config)}
        for step in range(12):
            client.push(grads)
            if step + 1 == 7:
                shards[0].save(str(paths[0]))
        shards[1].save(str(paths[1]))
        client.close()
    finally:
        stop()
    restored = [build_shard(config, s, 2, 1, mode="async", checkpoint=str(paths[s])) for s in range(2)]
    servers = [serve(shard, "127.0.0.1", 0) for shard in restored]
    try:
        assert [shard.steps_done[0] for shard in restored] == [7, 12]
        addresses = [f"127.0.0.1:{port}" for _, port in servers]
        trainer = Trainer(config, PSStep(addresses, requested_id=0))
        assert trainer.fit()["steps"] == 20
        assert [shard.steps_done[0] for shard in restored] == [20, 20]
        assert [shard.version for shard in restored] == [20, 20]
        assert [shard.pushes for shard in restored] == [13, 8]
    finally:
        for shard, (server, _) in zip(restored, servers):
            shard.stop()
            server.stop(0)


@pytest.mark.parametrize("ahead,staleness", [(2, 0), (6, 2)])
def test_bounded_workers_do_not_wait_for_one_retaking_steps_a_shard_has(caplog, ahead, staleness):
    # worker 0 is `ahead` steps further on shard 1 (restored from a newer checkpoint): shard 1 skips its
    # pushes of those steps. They must move its pacing clock there, as on shard 0; otherwise worker 1 waits
    # on shard 1 for worker 0 while worker 0 waits on shard 0 for worker 1, until one is dropped
    config = make_config({"epochs": 2, "progress": "none", "max_steps": 30})
    addresses, shards, stop = start_servers(config, 2, 2, mode="bounded", staleness=staleness, sync_timeout=4.0)
    try:
        shards[1].steps_done[0] = shards[1].version = ahead
        with caplog.at_level("WARNING", logger="distbp.ps"):
            trainers = train_workers(config, addresses, 2)
        assert "dropped worker(s)" not in caplog.text
        assert "has applied its steps up to" in caplog.text
        assert [t.step for t in trainers] == [30, 30]
        assert [shard.steps_done for shard in shards] == [{0: 30, 1: 30}] * 2
    finally:
        stop()


def test_server_reflection_lists_the_service():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 1, 1)
    try:
        with grpc.insecure_channel(addresses[0]) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in replies for s in r.list_services_response.service}
        assert "distbp.ps.v1.ParameterServer" in names and "grpc.health.v1.Health" in names
    finally:
        stop()


def test_a_taken_port_is_a_one_line_error():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, 1, 1)
    try:
        port = addresses[0].rsplit(":", 1)[1]
        done = subprocess.run([sys.executable, "-m", "distbp", "ps", "serve", "--port", port],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr.strip().startswith("distbp: error: ps serve: cannot listen on 127.0.0.1:")
        assert "Traceback" not in done.stderr
    finally:
        stop()


# --- lifecycle and misuse (from a review) ----------------------------------------------------------


def test_async_schedule_spans_every_push_of_every_worker():
    # the shard steps once per push: W times a round, so the schedule must be W times as long
    config = make_config({"epochs": 2, "progress": "none", "lr": 0.1, "momentum": 0.0})
    shard = build_shard(config, workers=4, mode="async")
    lrs = []
    for _ in range(4):  # each worker's whole run, one after the other: 4 times the steps of a sync run
        for _ in range(_rounds(config, 4)):
            shard.schedule.step()
        lrs.append(shard.optimizer.param_groups[0]["lr"])
    assert lrs[0] > 0.07 and lrs[1] > 0.04 and lrs[2] > 0.01, lrs  # the cosine spans all of them
    assert lrs[3] < 1e-6
    shard.stop()


def _rounds(config, workers):
    from distbp.data import BatchLoader, ShardSampler
    from distbp.train.trainer import build_data

    split = build_data(config)
    return config.epochs * len(BatchLoader(split.train, config.batch_size, ShardSampler(len(split.train), 0, workers)))


def test_a_push_of_a_superseded_registration_is_aborted():
    shard, chunks = _sync_shard_of_two_workers()
    shard.mode = "async"
    _, old, _ = shard.register(0, shard.signature)
    _, new, _ = shard.register(0, shard.signature)  # another process took id 0 (the first one stalled)
    assert old != new and old and new
    with pytest.raises(_Refused) as refused:
        shard.push(0, shard.version, iter(chunks(1.0)), sequence=7, registration=old)
    assert refused.value.code == grpc.StatusCode.ABORTED and "registered again" in refused.value.message
    np.testing.assert_array_equal(shard.params["w"].data, np.zeros(4, np.float32))
    assert shard.push(0, shard.version, iter(chunks(1.0)), sequence=1, registration=new) == 1
    shard.stop()


def test_two_processes_given_one_worker_id_the_older_one_stops():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, workers=2, mode="async")
    try:
        named = _named(config)
        first, second = PSClient(addresses, named), PSClient(addresses, named)
        first.register(requested_id=1)
        second.register(requested_id=1)
        grads = {n: np.zeros_like(p.data) for n, p in named}
        with pytest.raises(PSError, match="ABORTED.*registered again") as refused:
            first.push(grads)
        assert refused.value.code == grpc.StatusCode.ABORTED
        second.push(grads)
        assert shards[0].pushes == 1
    finally:
        stop()


def test_a_stopping_server_refuses_pushes_and_pulls_as_unavailable():
    shard, chunks = _sync_shard_of_two_workers()
    shard.stop()
    for attempt in (lambda: shard.push(0, 0, iter(chunks(1.0))), lambda: shard.pull_messages(0, 1, lambda: True)):
        with pytest.raises(_Refused) as refused:
            attempt()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # workers retry, and rejoin the restart
    assert shard.version == 0 and not shard.pending


def test_a_pull_for_a_future_version_is_refused():
    shard, _ = _sync_shard_of_two_workers()
    with pytest.raises(_Refused) as refused:
        _within(5, lambda: shard.pull_messages(0, 5, lambda: True))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "in the future" in refused.value.message
    shard.stop()


def test_an_async_pull_may_wait_for_the_other_workers_pushes():
    # version 2 on an async shard of two workers: worker 1 may push twice before worker 0 pushes again (it was
    # refused as a version no push of worker 0's could lead to); 3 cannot come before worker 0 pushes
    shard, chunks = _sync_shard_of_two_workers()
    shard.mode = "async"
    with pytest.raises(_Refused, match="at most 2 can come before this worker pushes again"):
        _within(5, lambda: shard.pull_messages(0, 3, lambda: True))
    got = []
    waiting = threading.Thread(target=lambda: got.append(list(shard.pull_messages(0, 2, lambda: True))), daemon=True)
    waiting.start()
    shard.push(1, 0, iter(chunks(1.0)))
    shard.push(1, 1, iter(chunks(1.0)))
    waiting.join(10)
    assert got and shard.version == 2
    shard.stop()


def test_a_push_whose_messages_disagree_names_the_field():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, (shard,), stop = start_servers(config, 1, 1, mode="async")
    try:
        client = PSClient(addresses, _named(config))
        client.register()
        named = _named(config)
        messages = [m for n, p in named for m in encode_chunks(n, np.zeros(p.data.shape, p.data.dtype),
                                                               [(1, 0), (5, client.registrations[0]), (6, 1)], 3)]
        messages[-1] = b"".join(encode_chunks(named[-1][0], np.zeros(named[-1][1].data.shape, np.float32),
                                              [(1, 0), (5, client.registrations[0]), (6, 2)], 3))
        push = grpc.insecure_channel(addresses[0]).stream_unary("/distbp.ps.v1.ParameterServer/Push")
        with pytest.raises(grpc.RpcError) as refused:
            push(iter(messages))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "step is 1 in its first message and 2 in a later one" in refused.value.details()
        assert shard.version == 0
    finally:
        stop()


def test_a_sync_shard_missing_workers_starts_without_them_after_the_timeout():
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0), sync_timeout=0.3)
    shard.mode, shard.expected, shard.restored = "sync", 2, True  # restarted from its checkpoint
    shard.register(0, shard.signature)  # worker 1 never comes back (it was dropped before the restart)
    start = time.monotonic()
    messages = _within(5, lambda: shard.pull_messages(0, 0, lambda: True))
    assert time.monotonic() - start < 5 and shard.started
    assert _values_of(messages)["w"].shape == (4,)
    shard.stop()


def _within(seconds, fn):
    """fn()'s result, failing (not hanging) if it takes longer than `seconds`."""
    result, error = [], []

    def run():
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the test's thread
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if error:
        raise error[0]
    assert result, f"still waiting after {seconds} s"
    return result[0]


def test_bounded_mode_drops_a_worker_that_holds_the_others_back():
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0), sync_timeout=0.3)
    shard.mode, shard.expected, shard.staleness = "bounded", 2, 1
    for wid in (0, 1):
        shard.register(wid, shard.signature)
    for _ in range(3):  # worker 0 runs ahead; worker 1 is dead
        shard.push(0, shard.version, iter(to_chunks("w", np.ones(4, np.float32))))
    _within(5, lambda: shard.pull_messages(0, 0, lambda: True))  # waits for worker 1 until it is dropped
    assert shard.active == {0}
    shard.stop()


def test_in_bounded_mode_a_finished_worker_does_not_hold_back_one_still_running():
    # worker 1, restarted, starts at the others' clock; worker 0 has made all its pushes and never pushes
    # again: worker 1 must not wait for it (it used to, until worker 0 was dropped after sync_timeout)
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0), sync_timeout=60.0,
                      steps_per_worker=2)
    shard.mode, shard.expected, shard.staleness = "bounded", 2, 1
    for wid in (0, 1):
        shard.register(wid, shard.signature)
    for wid in (0, 0, 1, 1, 1, 1):
        shard.push(wid, shard.version, iter(to_chunks("w", np.ones(4, np.float32))))
    assert shard.clocks == {0: 2, 1: 4}  # worker 1 is 2 > staleness ahead of the finished worker 0
    _within(5, lambda: shard.pull_messages(1, 0, lambda: True))
    assert shard.active == {0, 1}
    shard.stop()


def test_a_failed_periodic_checkpoint_does_not_fail_the_push(tmp_path, caplog):
    from distbp.optim import SGD

    (tmp_path / "afile").write_text("")
    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0),
                      checkpoint=str(tmp_path / "afile" / "ps.ckpt"), checkpoint_every=1)
    shard.register(0, shard.signature)
    assert shard.push(0, 0, iter(to_chunks("w", np.ones(4, np.float32)))) == 1
    assert "could not write the checkpoint of version 1" in caplog.text
    shard.stop()


def test_a_worker_given_the_shards_in_the_wrong_order_takes_no_worker_id():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, shards, stop = start_servers(config, num_shards=2, workers=2)
    try:
        with pytest.raises(PSError, match="is shard 1 of 2, but it is address 0"):
            PSClient(list(reversed(addresses)), _named(config)).register()
        assert all(not s.active for s in shards)
    finally:
        stop()


def test_shards_in_different_modes_are_refused():
    config = make_config({"epochs": 1, "progress": "none"})
    shard0 = build_shard(config, 0, 2, 2, mode="sync")
    shard1 = build_shard(config, 1, 2, 2, mode="async")
    servers = [serve(s, "127.0.0.1", 0) for s in (shard0, shard1)]
    try:
        with pytest.raises(PSError, match="runs in sync mode, .* in async mode"):
            PSClient([f"127.0.0.1:{port}" for _, port in servers], _named(config)).register()
    finally:
        for s, (server, _) in zip((shard0, shard1), servers):
            s.stop()
            server.stop(0)


def test_async_warm_up_spans_every_push_too():
    config = make_config({"epochs": 2, "progress": "none", "lr": 0.1, "warmup_steps": 30})
    sync, async_ = build_shard(config, workers=3, mode="sync"), build_shard(config, workers=3, mode="async")
    lrs = []
    for shard, steps in ((sync, 10), (async_, 30)):  # the same point of the run: 10 rounds
        for _ in range(steps):
            shard.schedule.step()
        lrs.append(shard.optimizer.param_groups[0]["lr"])
        shard.stop()
    assert lrs[0] == pytest.approx(lrs[1], rel=0.1) and lrs[0] < 0.05, lrs  # (was 3 times shorter: 0.1)


def test_a_first_start_waits_for_every_worker_however_slow():
    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1.0), sync_timeout=0.2)
    shard.mode, shard.expected = "sync", 2
    shard.register(0, shard.signature)
    time.sleep(0.6)  # three sync timeouts: a synchronous run still must not start with half its workers
    assert not shard.started
    shard.register(1, shard.signature)
    assert shard.started
    shard.stop()


def test_a_worker_with_equivalent_settings_is_accepted():
    from distbp.train.config import ps_settings

    config = make_config({"epochs": 1, "progress": "none"})  # dataset and lr left to their defaults
    addresses, _, stop = start_servers(config)
    try:
        same = make_config({"epochs": 1, "progress": "none", "dataset": "digits", "lr": 0.1, "optimizer": "sgd"})
        PSClient(addresses, _named(config), settings=ps_settings(same)).register()
    finally:
        stop()


def test_a_worker_with_another_run_length_is_refused():
    # bounded staleness stops pacing a worker once it has made its run's pushes: the lengths must agree
    from distbp.train.config import ps_settings

    config = make_config({"epochs": 1, "progress": "none", "max_steps": 2})
    addresses, _, stop = start_servers(config, mode="bounded")
    try:
        longer = make_config({"epochs": 1, "progress": "none"})
        with pytest.raises(PSError, match="the worker has max_steps = 0 but the server 2"):
            PSClient(addresses, _named(config), settings=ps_settings(longer)).register()
    finally:
        stop()


def test_a_charlm_worker_with_other_heads_is_refused_by_the_server():
    # n_heads shapes no parameter: the server's weights split into other heads are another model
    from distbp.nn import Parameter
    from distbp.optim import SGD
    from distbp.ps.server import Shard
    from distbp.train.config import PS_SHARED_KEYS, ps_settings

    base = {"model": "charlm", "d_model": 8, "n_layers": 1, "epochs": 1}
    two, four = (ps_settings(make_config({**base, "n_heads": n})) for n in (2, 4))
    p = Parameter(np.zeros(2, np.float32))
    shard = Shard({"w": p}, SGD([p], lr=0.1), mode="async", settings=two, setting_keys=set(PS_SHARED_KEYS))
    try:
        with pytest.raises(_Refused, match="the worker has n_heads = 4 but the server 2"):
            shard.register(0, shard.signature, four)
        assert "n_heads" not in ps_settings(make_config({"epochs": 1}))  # not the MLP's
    finally:
        shard.stop()


def test_a_worker_with_other_training_settings_is_refused_naming_the_setting():
    from distbp.train.config import ps_settings

    config = make_config({"epochs": 1, "progress": "none", "lr": 0.1})
    addresses, _, stop = start_servers(config)
    try:
        other = make_config({"epochs": 1, "progress": "none", "lr": 0.003, "optimizer": "adam"})
        with pytest.raises(PSError, match="FAILED_PRECONDITION: the worker has optimizer = 'adam' but the server 'sgd'"):
            PSClient(addresses, _named(config), settings=ps_settings(other)).register()
        PSClient(addresses, _named(config), settings=ps_settings(config)).register()
    finally:
        stop()


def test_a_worker_whose_copy_of_the_data_differs_from_the_servers_is_refused():
    # the same options on another machine, whose file at the same path holds other data
    from distbp.train.config import ps_settings

    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config)
    try:
        with pytest.raises(PSError, match="the worker's training data differs from the server's .fingerprints "
                                          "1438:0000abcd and 1438:[0-9a-f]{8}.: every machine's copy"):
            PSClient(addresses, _named(config), settings={**ps_settings(config), "data": "1438:0000abcd"}).register()
    finally:
        stop()


def _register_raw(address, signature, settings="", token=None):
    """Register with only the generated stubs, as a client in another language would."""
    from distbp.ps.v1 import ps_pb2_grpc

    metadata = [("authorization", token)] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        status = stub.Status(ps_pb2.StatusRequest(), metadata=metadata)
        reply = stub.Register(ps_pb2.RegisterRequest(worker_name="other", requested_id=-1, signature=signature,
                                                     settings=settings), metadata=metadata)
        return status, reply


def test_signature_numbers_are_json_values_and_settings_keep_booleans_apart():
    from distbp.ps.server import _parse_signature, _same_setting

    assert _parse_signature('[["w", [64.0, 6.4e1], "float32"]]') == _parse_signature('[["w",[64,64],"float32"]]')
    for bad in ('[["w", [true], "float32"]]', '[["w", [64.5], "float32"]]', "[" * 5000 + "]" * 5000):
        with pytest.raises(_Refused, match="signature is not JSON"):
            _parse_signature(bad)
    assert _same_setting(1, 1.0) and not _same_setting(True, 1) and not _same_setting(1, True)


@pytest.mark.parametrize("token", ["", " s3cret", "s3cret "])
def test_a_token_with_spaces_at_either_end_is_refused_by_server_and_worker(token):
    if token:  # (serve(token="") serves without a token, as token=None)
        with pytest.raises(ValueError, match="without spaces at either end"):
            serve(build_shard(make_config({"epochs": 1, "progress": "none"})), token=token)
    from distbp.train.config import ConfigError
    from distbp.train.launch import run

    if not token:  # refused with every other empty string option
        with pytest.raises(ConfigError, match="'ps_token' is empty"):
            make_config({"progress": "none", "backend": "ps", "ps": "127.0.0.1:1", "ps_token": token})
        return
    with pytest.raises(ConfigError, match="ps_token must be non-empty"):
        run(make_config({"progress": "none", "backend": "ps", "ps": "127.0.0.1:1", "ps_token": token}))


def test_a_client_learns_the_signature_from_status_and_any_json_spelling_of_it_registers():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config, 1, 2)
    try:
        with grpc.insecure_channel(addresses[0]) as channel:
            from distbp.ps.v1 import ps_pb2_grpc

            status = ps_pb2_grpc.ParameterServerStub(channel).Status(ps_pb2.StatusRequest())
        model = json.loads(status.signature)
        assert [name for name, _, _ in model] == [n for n, _ in _named(config)]
        compact = json.dumps(model, separators=(",", ":"))  # Go's, JavaScript's and Rust's spelling
        assert compact != status.signature
        _, reply = _register_raw(addresses[0], compact)
        assert reply.worker_id == 0
        with pytest.raises(grpc.RpcError) as refused:
            _register_raw(addresses[0], json.dumps([[n, s, "<f4"] for n, s, _ in model]))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as refused:
            _register_raw(addresses[0], "{not json")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "signature is not JSON" in refused.value.details()
    finally:
        stop()


def test_unknown_settings_are_refused_naming_them():
    # a client that misspells a key must not believe it was checked
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config)
    try:
        signature = PSClient(addresses, _named(config)).signature
        with pytest.raises(grpc.RpcError) as refused:
            _register_raw(addresses[0], signature, settings='{"learning_rate": 0.5, "lr": 0.1}')
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown settings ['learning_rate']" in refused.value.details()
        # momentum is a known key even where the server's optimizer has none (Adam): compared only where it applies
        assert _register_raw(addresses[0], signature, settings='{"lr": 0.1, "momentum": 0.9}')[1].worker_id == 0
    finally:
        stop()


def test_the_settings_keys_are_the_ones_the_proto_lists():
    from distbp.train.config import PS_SHARED_KEYS

    proto = " ".join((ROOT / "protos/distbp/ps/v1/ps.proto").read_text().replace("//", " ").split())
    listed = proto.split("with some of the keys ")[1].split(" (the `distbp train` options")[0]
    assert [k.strip() for k in listed.split(",")] == list(PS_SHARED_KEYS)


def test_the_token_scheme_is_case_insensitive_and_documented():
    config = make_config({"epochs": 1, "progress": "none"})
    addresses, _, stop = start_servers(config, 1, 1, token="s3cret")
    try:
        signature = PSClient(addresses, _named(config)).signature
        assert _register_raw(addresses[0], signature, token="bearer s3cret")[1].worker_id == 0
        for header in ("s3cret", "Bearer wrong", "Basic s3cret"):
            with pytest.raises(grpc.RpcError) as refused:
                _register_raw(addresses[0], signature, token=header)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop()
    assert "`authorization: Bearer T`" in (ROOT / "protos/distbp/ps/v1/ps.proto").read_text()


def test_a_finite_gradient_whose_square_overflows_is_applied_without_a_warning():
    import warnings

    from distbp.optim import SGD

    shard = _shard_of({"w": np.zeros(4, np.float32)}, lambda ps: SGD(ps, lr=1e-40))
    shard.register(0, shard.signature)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _push_arrays(shard, {"w": np.full(4, 3e38, np.float32)})
    assert shard.version == 1 and np.isfinite(shard.params["w"].data).all()


def _serve_args(**overrides):
    import argparse

    values = dict(port=0, workers=1, num_shards=1, staleness=2, checkpoint_every_versions=0, sync_timeout=60.0,
                  tls_cert=None, tls_key=None, tls_client_ca=None, checkpoint_path=None, token=None)
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize("overrides,words", [
    (dict(port=70000), "--port must be in [0, 65535]"), (dict(port=-1), "--port"),
    (dict(workers=0), "--workers must be >= 1"), (dict(staleness=-1), "--staleness must be >= 0"),
    (dict(num_shards=0), "--num-shards must be >= 1"),
    (dict(checkpoint_every_versions=-1), "--checkpoint-every-versions"),
    (dict(sync_timeout=0.0), "--sync-timeout must be a positive"), (dict(sync_timeout=float("nan")), "--sync-timeout"),
    (dict(tls_key="k.pem"), "need --tls-cert"), (dict(tls_client_ca="ca.pem"), "need --tls-cert"),
    (dict(tls_cert="c.pem"), "--tls-cert needs --tls-key"),
    (dict(tls_cert="missing-c.pem", tls_key="missing-k.pem"), "missing-c.pem"),
    (dict(checkpoint_every_versions=5), "--checkpoint-every-versions needs --checkpoint-path"),
    (dict(token=" t"), "--token must be non-empty, without spaces"), (dict(token=""), "--token must be non-empty"),
])
def test_server_options_that_cannot_work_are_refused(overrides, words):
    from distbp.train.config import ConfigError
    from distbp.train.ps_service import check_server_options

    with pytest.raises(ConfigError, match=re_escape(words)):
        check_server_options(make_config({"progress": "none"}), _serve_args(**overrides))


def re_escape(text):
    import re

    return re.escape(text)


@pytest.mark.parametrize("key,value,words", [("checkpoint", "x.ckpt", "checkpoint: options of distbp train"),
                                             ("resume", True, "resume"), ("grad_clip", 1.0, "grad_clip")])
def test_server_refuses_options_it_would_ignore(key, value, words):
    from distbp.train.config import ConfigError
    from distbp.train.ps_service import check_server_options

    with pytest.raises(ConfigError, match=words):
        check_server_options(make_config({"progress": "none", key: value}), _serve_args())


def test_server_refuses_an_unwritable_checkpoint_path_at_start(tmp_path):
    from distbp.train.config import ConfigError
    from distbp.train.ps_service import check_server_options

    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="--checkpoint-path is .* not a directory"):
        check_server_options(make_config({"progress": "none"}), _serve_args(checkpoint_path=str(tmp_path / "afile/x")))


@pytest.mark.parametrize("overrides,words", [
    (dict(grad_clip=1.0), "grad_clip is not supported with backend 'ps'"),
    (dict(ps_tls_cert="c.pem"), "needs both 'ps_tls_cert' and 'ps_tls_key'"),
    (dict(ps_tls_ca="missing-ca.pem"), "missing-ca.pem"),
    (dict(init_from="w.ckpt"), "drop 'checkpoint', 'resume' and 'init_from'"),
    # refused before the worker registers (it would hold a worker id the others then wait for)
    (dict(resume=True), "drop 'checkpoint', 'resume' and 'init_from'"),
])
def test_worker_options_that_cannot_work_are_refused(overrides, words):
    from distbp.train.config import ConfigError
    from distbp.train.launch import run

    with pytest.raises(ConfigError, match=words):
        run(make_config({"progress": "none", "backend": "ps", "ps": "127.0.0.1:1", **overrides}))


@pytest.mark.parametrize("overrides,words", [
    (dict(backend="local", ps="127.0.0.1:1"), "'ps' is an option of backend ps, but the backend is local"),
    (dict(backend="threads", world_size=2, ps_token="t", ps_worker_id=1),
     "'ps_token', 'ps_worker_id' are options of backend ps (and 'ps' gives the servers' addresses), but the "
     "backend is threads"),
    (dict(ps_tls_ca="ca.pem"), "'ps_tls_ca' is an option of backend ps (and 'ps' gives"),
    (dict(ps_retry_seconds=5.0), "'ps_retry_seconds' is an option of backend ps"),
    (dict(ps="127.0.0.1:1", world_size=2), "'world_size' is for the threads backend; with ps, the servers' --workers"),
])
def test_parameter_server_options_of_another_backend_are_refused(overrides, words):
    # ignored, they would let a run meant for the servers train alone
    from distbp.train.config import ConfigError
    from distbp.train.launch import resolve_backend

    with pytest.raises(ConfigError, match=re_escape(words)):
        resolve_backend(make_config({"progress": "none", **overrides}))


def test_a_server_listens_on_an_ipv6_address_written_without_brackets():
    config = make_config({"epochs": 1, "progress": "none"})
    shard = build_shard(config)
    try:
        server, port = serve(shard, "::1", 0)
    except OSError as e:  # pragma: no cover - a machine without IPv6
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        client = PSClient([f"[::1]:{port}"], _named(config))
        assert client.status()[0].shard == 0
        client.close()
    finally:
        shard.stop()
        server.stop(0)


@pytest.mark.parametrize("first", ["retried", "refusing"])
def test_sigterm_ends_a_worker_retrying_several_shards_at_once(tmp_path, first):
    # the other shards' calls run in threads that the signal does not reach: they are cancelled, not waited
    # for (a worker used to go on retrying them for --ps-retry-seconds). "refusing": shard 0 has refused the
    # worker (a wrong token) and the signal comes while the worker waits for shard 1's retries to end
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    if first == "refusing":
        config = make_config({"epochs": 1, "progress": "none"})
        shard = build_shard(config, 0, 2, 1)
        server, port = serve(shard, "127.0.0.1", 0, token="goodtokengoodtoken1234")
        addresses[0] = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", "--ps", ",".join(addresses), "--ps-retry-seconds",
                             "60", "--ps-token", "badtokenbadtoken12345678", "--progress", "none"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "retrying for up to 60 s" not in proc.stderr.readline():
            assert proc.poll() is None and time.monotonic() < deadline
        if first == "refusing":  # shard 0 answers at once: the signal comes during shard 1's retries after that
            time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if first == "refusing":
            shard.stop()
            server.stop(0)
    assert proc.returncode == 143 and took < 20, (proc.returncode, took, err[-2000:])
    assert err.strip().splitlines()[-1] == "distbp: terminated"


def test_a_worker_waiting_for_a_server_says_so_once_and_then_every_few_seconds(caplog, monkeypatch):
    # it used to print a line per retry: about 30 a minute, before every normal start of the cluster script
    from distbp.ps import client as client_module

    monkeypatch.setattr(client_module, "RETRY_REPORT_SECONDS", 1.0)
    address = f"127.0.0.1:{_free_port()}"
    client = PSClient([address], [], retry_seconds=2.5)
    try:
        with caplog.at_level(logging.INFO, logger="distbp.ps"), pytest.raises(PSError) as raised:
            client.status()
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines[0] == (f"status: shard 0 at {address} is unavailable (UNAVAILABLE): no server answers there yet, "
                        "or it is restarting (or it serves TLS, and this worker was given no --ps-tls-ca); "
                        "retrying for up to 2.5 s"), lines
    assert 1 <= len(lines) - 1 <= 2 and all("still unavailable after" in line for line in lines[1:]), lines
    assert re.match(rf"status on shard 0 at {address} \(unavailable for \d+ s\): UNAVAILABLE", str(raised.value))


def test_a_channel_whose_close_never_ends_does_not_hold_a_stopping_worker(monkeypatch):
    # gRPC's close waits for its calls' bookkeeping, which a signal inside gRPC's start of a call can leave
    # unfinished: the cluster script's Ctrl-C test hung on it once in a few runs
    from distbp.ps import client as client_module

    monkeypatch.setattr(client_module, "CLOSE_SECONDS", 0.5)
    client = PSClient([f"127.0.0.1:{_free_port()}"], [], retry_seconds=1)
    never = threading.Event()
    real_channels = client.channels

    class StuckChannel:
        def close(self):
            never.wait()

    client.channels = [StuckChannel()]
    try:
        stopper = threading.Thread(target=client._stop)
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive() and client.stopping.is_set()
    finally:
        never.set()
        client.channels = real_channels
        client.close()


def test_a_signal_while_the_calls_start_stops_those_already_running(monkeypatch):
    # the pool's thread for shard 1 may already be retrying when the signal interrupts the main thread in
    # the pool's submit (it waits for the new thread to start): that call must end too, not retry on
    client = PSClient([f"127.0.0.1:{_free_port()}" for _ in range(3)], [], retry_seconds=60)
    submit = client.pool.submit
    retrying = threading.Event()

    def submit_then_signal(fn, shard):
        future = submit(fn, shard)
        if shard == 2:
            assert retrying.wait(10)
            raise KeyboardInterrupt
        return future

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    def status(shard):
        def call():
            retrying.set()
            raise Unavailable()
        return client._call("status", shard, call)

    monkeypatch.setattr(client.pool, "submit", submit_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            client._each(status)
        assert client.stopping.is_set()
        ended = threading.Thread(target=client.pool.shutdown, kwargs={"wait": True})
        ended.start()
        ended.join(20)  # the retrying call ends at once, not at its 60 s deadline
        assert not ended.is_alive()
    finally:
        client.close()


def test_parameter_server_addresses_choose_the_ps_backend():
    from distbp.train.launch import resolve_backend

    assert resolve_backend(make_config({"ps": "127.0.0.1:1"})) == "ps"
    assert resolve_backend(make_config({})) == "local"


@pytest.mark.parametrize("args", [["--epochs", "1"], ["2", "--epochs", "1"], ["0", "2"], ["2", "0"], ["x", "1"]])
def test_the_cluster_script_refuses_counts_that_are_not_positive_integers(args):
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())})
    assert done.returncode == 2 and "SERVERS and WORKERS must be positive integers" in done.stderr, done.stderr


@pytest.mark.parametrize("args, env, said", [
    (["1", "2", "--mode", "sync", "--epochs", "1"], {}, "--mode is a server option: end the server options with --"),
    (["1", "1", "--", "--epochs", "1"], {"BASE_PORT": "abc"}, "BASE_PORT must be a port number"),
    (["2", "1", "--", "--epochs", "1"], {"BASE_PORT": "65535"}, "with room for 2 server(s) above it (1-65534)"),
    # past bash's integer: '[: integer expression expected', and the job started anyway
    (["1", "1", "--", "--epochs", "1"], {"BASE_PORT": "99999999999999999999"}, "BASE_PORT must be a port number"),
    (["1", "99999999999999999999", "--", "--epochs", "1"], {}, "SERVERS and WORKERS must be at most 999999"),
    (["1", "1", "--", "--epochs", "1"], {"STOP_GRACE": "99999999999999999999"}, "STOP_GRACE must be a whole number"),
    (["2", "2", "--", "--epochs", "1"], {"PYTHON": "/nonexistent/python"},
     "PYTHON '/nonexistent/python' is not a command here"),
    # options the script sets itself overrode it: '--workers 3' with 2 workers waited for ever, '--port' made the
    # workers dial a port where no server listened
    (["1", "2", "--workers", "3", "--", "--epochs", "1"], {}, "--workers is set by the script from WORKERS"),
    (["2", "1", "--num-shards=3", "--", "--epochs", "1"], {}, "--num-shards is set by the script from SERVERS"),
    (["1", "1", "--port", "5000", "--", "--epochs", "1"], {}, "--port is set by the script from BASE_PORT"),
    (["1", "1", "--host=127.0.0.2", "--", "--epochs", "1"], {}, "--host is set by the script as 127.0.0.1"),
    (["1", "1", "--", "--epochs", "1", "--shard", "1"], {}, "--shard is set by the script from SERVERS"),
    # the workers' own: two workers asking for id 1 left the sync server waiting for worker 0 for ever
    (["1", "2", "--", "--epochs", "1", "--ps-worker-id", "1"], {}, "--ps-worker-id is set by the script from WORKERS"),
    (["1", "1", "--", "--ps=127.0.0.1:1"], {}, "--ps is set by the script from SERVERS and BASE_PORT"),
    (["1", "1", "--", "--backend", "local"], {}, "--backend is set by the script as ps"),
    (["1", "1", "--token=", "--", "--epochs", "1"], {}, "--token needs a value"),
], ids=["server-option-without-separator", "port-not-a-number", "ports-past-the-last", "port-past-bash-integers",
        "count-past-bash-integers", "grace-past-bash-integers", "python-not-found", "workers-option", "shards-option",
        "port-option", "host-option", "shard-among-training-options", "worker-id-option", "ps-option",
        "backend-option", "empty-token"])
def test_the_cluster_script_names_what_is_wrong_before_starting_anything(args, env, said):
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port()), **env})
    assert done.returncode == 2 and said in done.stderr, done.stderr


def test_the_cluster_script_ends_when_a_server_cannot_start():
    # the workers would otherwise retry a server that is not coming for a minute
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(busy.getsockname()[1])}
        start = time.monotonic()
        done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "2", "--", "--epochs", "1"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and time.monotonic() - start < 30, done.stderr
    assert "address is in use" in done.stderr and "a server (pid" in done.stderr


def test_ctrl_c_stops_the_whole_cluster_script(tmp_path):
    script = ROOT / "launch" / "ps_cluster.sh"
    env = {**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())}
    proc = subprocess.Popen(["bash", str(script), "1", "2", "--mode", "sync", "--", "--epochs", "200",
                             "--progress", "plain", "--log-every", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        while "step" not in proc.stdout.readline():  # the workers train
            assert proc.poll() is None, proc.stderr.read()
        children = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "distbp"], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 3  # a server and two workers (the script's other child is its poll's sleep)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.monotonic() - start < 15 and proc.returncode == 130
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_cluster_script_kills_a_process_that_ignores_sigterm(tmp_path):
    # a worker that does not stop (here: a stand-in that ignores SIGTERM) is killed STOP_GRACE seconds after
    # the SIGTERM, instead of the script waiting for it for ever
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$3" = train ]; then trap "" TERM; exec -a distbp-stuck-worker sleep 600; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "BASE_PORT": str(_free_port()), "STOP_GRACE": "2"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1", "--", "--epochs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while "serving on" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        deadline = time.monotonic() + 30  # the worker starts once the script finds the server's port open
        while True:
            children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "distbp"], capture_output=True,
                                      text=True).stdout.split()
            if len(children) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(children) == 2  # the server and the stuck worker
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode == 130 and 2 <= time.monotonic() - start < 15
        err = proc.stderr.read()
        assert "still running 2 s after SIGTERM (STOP_GRACE)" in err, err
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-KILL", "-f", "distbp-stuck-worker"])  # (left behind only if the test failed)


def _run_cluster_script(args, python, timeout=90):
    """(return code, stderr, seconds) of ps_cluster.sh in a session of its own, whatever of it is left killed."""
    env = {**os.environ, "PYTHON": str(python), "BASE_PORT": str(_free_port())}
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "ps_cluster.sh"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.monotonic() - start
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what a script that did not end, or did not stop, left running
        except ProcessLookupError:
            pass
        proc.wait()


def test_the_cluster_script_ends_when_a_worker_dies_before_it_registers(tmp_path):
    # worker 0 killed at start: the sync server waited for it, worker 1 in its pull, and the script for worker 1,
    # for ever
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase " $* " in *" --ps-worker-id 0 "*) kill -KILL $$ ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    code, err, seconds = _run_cluster_script(["1", "2", "--mode", "sync", "--", "--epochs", "1"], python)
    assert code == 128 + signal.SIGKILL and seconds < 60, err
    assert "worker 0 (pid" in err and f"exited with status {128 + signal.SIGKILL}: stopping the others" in err, err


def test_the_cluster_script_fails_when_a_server_fails_as_it_stops(tmp_path):
    # (a final checkpoint that cannot be written, say) the script waited for its servers but said 0
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$3" = ps ]; then\n  {sys.executable} "$@" & child=$!\n'
                      f'  trap \'kill -TERM $child; wait $child; exit 3\' TERM\n  wait $child\n  exit\nfi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    code, err, _ = _run_cluster_script(["1", "1", "--", "--epochs", "1", "--max-steps", "1", "--progress", "none"],
                                       python)
    assert code == 3 and "a server (pid" in err and "exited with status 3 as it stopped" in err, err


def test_the_cluster_script_refuses_a_bad_stop_grace():
    env = {**os.environ, "PYTHON": sys.executable, "STOP_GRACE": "soon"}
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1"], capture_output=True, text=True,
                          timeout=30, env=env)
    assert done.returncode == 2 and "STOP_GRACE must be a whole number of seconds, not 'soon'" in done.stderr


def test_the_cluster_script_starts_the_workers_once_the_servers_listen(tmp_path):
    # the workers started with the servers, and each warned that every shard was unavailable, retrying; a user's
    # --progress overrode the script's 'none' for the workers after 0
    log = tmp_path / "started"
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {log}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "BASE_PORT": str(_free_port())}
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "2", "2", "--mode", "sync", "--",
                           "--epochs", "1", "--max-steps", "2", "--progress", "plain"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "unavailable" not in done.stderr, done.stderr
    workers = sorted((line for line in log.read_text().splitlines() if " train " in f" {line} "),
                     key=lambda line: "--ps-worker-id 1" in line)
    assert [line.split("--progress ")[-1].split()[0] for line in workers] == ["plain", "none"], workers


def test_the_cluster_script_splits_its_options_at_an_argument_that_is_exactly_the_separator(tmp_path):
    # a " -- " inside an argument (a path with spaces) was taken for the separator: the script shifted past
    # its last argument and stopped on an unbound variable
    metrics = tmp_path / "a -- b.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "BASE_PORT": str(_free_port())}
    done = subprocess.run(["bash", str(ROOT / "launch" / "ps_cluster.sh"), "1", "1", "--epochs", "1", "--max-steps", "1",
                           "--progress", "none", "--metrics", str(metrics)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert metrics.read_text().count("test_accuracy") == 1


def test_a_server_checkpoint_of_other_data_is_refused_at_restore(tmp_path):
    # the fingerprint was saved with the settings but not compared: a server restarted on another machine's
    # copy of the data went on, and so did its workers
    from distbp.serialization import CheckpointError

    text = "".join(chr(97 + i % 7) for i in range(3000))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text[::-1])
    options = {"epochs": 1, "progress": "none", "model": "charlm", "max_chars": 3000}
    first = build_shard(make_config({**options, "text_file": str(tmp_path / "a.txt")}), mode="async")
    first.save(tmp_path / "ps.ckpt")
    first.stop()
    with pytest.raises(CheckpointError, match=r"written on other training data .fingerprint \d+:[0-9a-f]{8}. than "
                                              r"this server's .\d+:[0-9a-f]{8}."):
        build_shard(make_config({**options, "text_file": str(tmp_path / "b.txt")}), mode="async",
                    checkpoint=str(tmp_path / "ps.ckpt"))
    build_shard(make_config({**options, "text_file": str(tmp_path / "a.txt")}), mode="async",
                checkpoint=str(tmp_path / "ps.ckpt")).stop()  # the same data restores


def test_a_single_servers_checkpoint_named_as_the_cluster_script_named_it_is_refused(tmp_path):
    # the script named a single server's file FILE.shard0; the server now writes FILE, and started over
    from distbp.train.config import ConfigError
    from distbp.train.ps_service import shard_checkpoint_path

    (tmp_path / "ck.shard0").write_bytes(b"an older job's checkpoint")
    with pytest.raises(ConfigError, match=r"no checkpoint at .*ck, but one at .*ck.shard0 .*rename it to"):
        shard_checkpoint_path(str(tmp_path / "ck"), 0, 1)
    (tmp_path / "ck").write_bytes(b"renamed")
    assert shard_checkpoint_path(str(tmp_path / "ck"), 0, 1) == str(tmp_path / "ck")


def test_a_checkpoint_of_another_sharding_is_refused(tmp_path):
    from distbp.serialization import CheckpointError

    config = make_config({"epochs": 1, "progress": "none"})
    whole = build_shard(config, 0, 1, 1, mode="async")
    whole.save(tmp_path / "ps.ckpt")
    whole.stop()
    with pytest.raises(CheckpointError, match="checkpoint of shard 0 of 1 .* this server is shard 0 of 2"):
        build_shard(config, 0, 2, 1, mode="async", checkpoint=str(tmp_path / "ps.ckpt"))


def test_a_shard_dropped_without_stop_ends_its_straggler_monitor():
    # a shard that never served (its port was taken, say) was watched for ever by its monitor thread
    import gc
    import threading
    import time

    from distbp.nn import Parameter
    from distbp.optim import SGD
    from distbp.ps.server import Shard

    before = threading.active_count()
    for _ in range(5):
        params = {"w": Parameter(np.zeros(3, np.float32))}
        Shard(params, SGD(list(params.values()), lr=0.1), mode="sync", workers=1)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert threading.active_count() <= before
