"""Data sets (IDX files, digits, text) and the sharding sampler / batch loader."""

import gzip
import json
import math
import re
import shutil
import struct
from collections import Counter

import numpy as np
import pytest

from distbp import cli
from distbp.data import (
    ArrayDataset, BatchLoader, CharDataset, DataError, ShardSampler, load_digits, load_idx_dir, load_synthetic,
    load_text,
    read_idx,
)

# --- IDX helpers ---------------------------------------------------------------------------------------

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
          np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr, dtype=np.uint8):
    """The IDX encoding of `arr` stored as `dtype` (big-endian for multi-byte types, as the format says)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
    arr = np.asarray(arr).astype(dtype)
    head = bytes([0, 0, _CODES[dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


def write_idx(path, arr, dtype=np.uint8, compress=False):
    data = idx_bytes(arr, dtype)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


MNIST_NAMES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def make_mnist_dir(directory, n_train=96, n_test=40, h=6, w=5, compress=False, seed=0, classes=10):
    """A directory with the four MNIST file names holding random uint8 images and labels; returns arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "train_y": rng.integers(0, classes, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "test_y": rng.integers(0, classes, n_test).astype(np.uint8),
    }
    arrays["train_x"][0, 0, 0], arrays["train_x"][0, 0, 1] = 0, 255  # both ends of the range present
    arrays["train_y"][:classes] = np.arange(classes)  # every class present
    for key, stem in MNIST_NAMES.items():
        name = stem + (".gz" if compress else "")
        write_idx(directory / name, arrays[key], compress=compress)
    return arrays


# --- IDX reading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    got_x = read_idx(write_idx(tmp_path / "x", images, compress=compress))
    got_y = read_idx(write_idx(tmp_path / "y", labels, compress=compress))
    assert got_x.shape == (7, 4, 3) and got_x.dtype == np.uint8
    assert got_y.shape == (7,) and got_y.dtype == np.uint8
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)


@pytest.mark.parametrize("dtype", [np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_multibyte_types_are_big_endian(tmp_path, dtype):
    values = np.array([[-3, 0, 1], [100, -100, 7]])
    got = read_idx(write_idx(tmp_path / "a", values, dtype=dtype))
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got.astype(np.float64), values)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "flat"])
def test_load_idx_dir(tmp_path, compress, images):
    arrays = make_mnist_dir(tmp_path / "mnist", compress=compress)
    split = load_idx_dir(tmp_path / "mnist", images=images)
    shape = (1, 6, 5) if images else (30,)
    assert split.input_shape == shape
    assert split.num_classes == 10
    assert split.train.x.shape == (96,) + shape and split.test.x.shape == (40,) + shape
    assert split.train.y.shape == (96,) and split.test.y.shape == (40,)
    for ds, key in ((split.train, "train"), (split.test, "test")):
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
        np.testing.assert_allclose(ds.x.reshape(len(ds), 6, 5), arrays[key + "_x"] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y, arrays[key + "_y"])
    assert split.train.x.min() == 0.0 and split.train.x.max() == 1.0


def test_load_idx_dir_mixed_plain_and_gzip_and_dotted_names(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "d"
    d.mkdir()
    x = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    y = np.arange(12, dtype=np.uint8) % 3
    write_idx(d / "train-images.idx3-ubyte", x)  # the dotted spelling some mirrors use
    write_idx(d / "train-labels-idx1-ubyte.gz", y, compress=True)
    write_idx(d / "t10k-images-idx3-ubyte", x[:5])
    write_idx(d / "t10k-labels-idx1-ubyte", y[:5])
    split = load_idx_dir(d, images=False)
    assert split.train.x.shape == (12, 16) and split.test.x.shape == (5, 16)
    assert split.num_classes == 3
    np.testing.assert_array_equal(split.train.y, y)


def test_cli_trains_on_idx_dir(tmp_path, capsys):
    make_mnist_dir(tmp_path / "mnist", n_train=64, n_test=32, compress=True)
    metrics = tmp_path / "m.jsonl"
    rc = cli.main(["train", "--dataset", "idx", "--data-dir", str(tmp_path / "mnist"), "--epochs", "1",
                   "--progress", "none", "--metrics", str(metrics), "--hidden", "16"])
    assert rc == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert records, "training wrote no metrics"
    last = records[-1]
    assert last["step"] == 2  # 64 examples / batch 32
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["test_loss"])
    assert 0.0 <= last["test_accuracy"] <= 1.0


# --- bad IDX input ---------------------------------------------------------------------------------------


def _good_image_bytes():
    return idx_bytes(np.zeros((3, 4, 4), np.uint8))


def _corrupt_deflate(data):
    gz = bytearray(gzip.compress(data))
    for i in range(12, 20):  # inside the deflate stream, after the 10-byte gzip header
        gz[i] ^= 0xFF
    return bytes(gz)


def _flip_crc(data):
    gz = bytearray(gzip.compress(data))
    gz[-8] ^= 0xFF
    return bytes(gz)


BAD_FILES = [
    pytest.param(b"\x01\x00\x08\x03" + _good_image_bytes()[4:], "magic", id="bad-magic"),
    pytest.param(b"PK\x03\x04 not idx", "magic", id="bad-magic-zip"),
    pytest.param(b"\x00\x00", "magic", id="too-short-for-magic"),
    pytest.param(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "type", id="unknown-type-code"),
    pytest.param(b"\x00\x00\x08\x03" + struct.pack(">I", 3) + b"\x00\x00", "truncated", id="truncated-header"),
    pytest.param(_good_image_bytes()[:-5], "header says", id="data-short"),
    pytest.param(_good_image_bytes() + b"\x00" * 3, "header says", id="data-long"),
    pytest.param(b"\x1f\x8b" + b"garbage" * 8, "gzip", id="gzip-bad-header"),
    pytest.param(gzip.compress(_good_image_bytes())[:30], "gzip", id="gzip-truncated"),
    pytest.param(_flip_crc(_good_image_bytes()), "gzip", id="gzip-bad-crc"),
    pytest.param(_corrupt_deflate(_good_image_bytes() * 4), "gzip", id="gzip-corrupt-stream"),
]


@pytest.mark.parametrize("content, problem", BAD_FILES)
def test_read_idx_bad_input_raises_data_error(tmp_path, content, problem):
    path = tmp_path / "bad-file-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_idx(path)
    msg = str(err.value)
    assert "bad-file-idx3-ubyte" in msg
    assert problem in msg.lower()


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere-idx1-ubyte"):
        read_idx(tmp_path / "nothere-idx1-ubyte")


def test_load_idx_dir_missing_directory(tmp_path):
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path / "no-such-dir")
    assert "no-such-dir" in str(err.value) and "does not exist" in str(err.value)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="a-file is not a directory"):
        load_idx_dir(tmp_path / "a-file")


@pytest.mark.parametrize("missing", list(MNIST_NAMES))
def test_load_idx_dir_missing_one_file(tmp_path, missing):
    make_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / MNIST_NAMES[missing]).unlink()
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path / "d")
    assert MNIST_NAMES[missing] in str(err.value)


def test_load_idx_dir_bad_file_is_named(tmp_path):
    make_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 40) + b"\0")
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path / "d")
    assert "t10k-labels-idx1-ubyte" in str(err.value) and "header says" in str(err.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_load_idx_dir_count_mismatch(tmp_path, compress):
    make_mnist_dir(tmp_path / "d", compress=compress)
    name = "train-labels-idx1-ubyte" + (".gz" if compress else "")
    write_idx(tmp_path / "d" / name, np.zeros(95, np.uint8), compress=compress)
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path / "d")
    msg = str(err.value)
    assert str(tmp_path / "d") in msg and "96" in msg and "95" in msg and "labels" in msg


def test_load_idx_dir_wrong_rank(tmp_path):
    make_mnist_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-images-idx3-ubyte", np.zeros((96, 30), np.uint8))  # 2-d images
    with pytest.raises(DataError, match="3-d"):
        load_idx_dir(tmp_path / "d")


# --- digits --------------------------------------------------------------------------------------------


def _rows(x, y):
    """Rows of (pixels, label) as a sorted array: a multiset of examples."""
    table = np.concatenate([x.reshape(len(x), -1).astype(np.float64), y[:, None].astype(np.float64)], axis=1)
    return table[np.lexsort(table.T[::-1])]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split(digits):
    from sklearn.datasets import load_digits as sk_digits

    split = digits
    assert len(split.train) + len(split.test) == 1797
    assert len(split.test) == round(1797 * 0.2)
    assert split.input_shape == (64,) and split.num_classes == 10
    assert split.train.x.shape == (len(split.train), 64)
    for ds in (split.train, split.test):
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
        assert set(np.unique(ds.y)) == set(range(10))
    assert split.train.x.max() == 1.0
    # train and test together are exactly the 1,797 examples: a partition, so no example is in both
    bunch = sk_digits()
    full = _rows((bunch.data / 16.0).astype(np.float32), bunch.target)
    both = _rows(np.concatenate([split.train.x, split.test.x]), np.concatenate([split.train.y, split.test.y]))
    np.testing.assert_array_equal(both, full)


def test_digits_images_and_determinism(digits):
    img = load_digits(images=True)
    assert img.input_shape == (1, 8, 8)
    assert img.train.x.shape == (len(digits.train), 1, 8, 8) and img.test.x.shape == (len(digits.test), 1, 8, 8)
    np.testing.assert_array_equal(img.train.x.reshape(-1, 64), digits.train.x)  # same split, reshaped
    np.testing.assert_array_equal(img.test.y, digits.test.y)
    other = load_digits(seed=1)
    assert not np.array_equal(other.test.y, digits.test.y) or not np.array_equal(other.test.x, digits.test.x)
    x, y = digits.train[np.array([0, 5, 7])]
    assert x.shape == (3, 64) and y.shape == (3,)


# --- text ----------------------------------------------------------------------------------------------

TEXT = "def f(x):\n    return x * 2  # héllo ✓ 🎉\n" * 12


def test_load_text_from_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    split = load_text(path, block_size=8, test_fraction=0.25)
    vocab = split.meta["vocab"]
    assert vocab == "".join(sorted(set(TEXT)))
    assert split.num_classes == len(vocab) and split.input_shape == (8,)
    assert split.meta["source"] == str(path)
    decoded = "".join(vocab[c] for c in np.concatenate([split.train.codes, split.test.codes]))
    assert decoded == TEXT
    assert len(split.train.codes) == int(len(TEXT) * 0.75)
    ds = split.train
    assert isinstance(ds, CharDataset)
    assert len(ds) == (len(ds.codes) - 1) // 8
    idx = np.array([0, 3, len(ds) - 1])
    x, y = ds[idx]
    assert x.shape == (3, 8) and y.shape == (3, 8)
    assert np.issubdtype(x.dtype, np.integer)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row, i in enumerate(idx):
        s = i * 8
        assert "".join(vocab[c] for c in x[row]) == TEXT[s:s + 8]
        assert "".join(vocab[c] for c in y[row]) == TEXT[s + 1:s + 9]


def test_load_text_max_chars(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    split = load_text(path, block_size=4, max_chars=200)
    assert len(split.train.codes) + len(split.test.codes) == 200


def test_load_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 20)
    with pytest.raises(DataError) as err:
        load_text(path, block_size=4)
    assert "latin1.txt" in str(err.value) and "UTF-8" in str(err.value)


def test_load_text_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_text(tmp_path / "gone.txt")
    assert "gone.txt" in str(err.value) and "does not exist" in str(err.value)


def test_load_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcabcabc", encoding="utf-8")
    with pytest.raises(DataError, match="block_size"):
        load_text(path, block_size=64)


@pytest.mark.parametrize("chars,max_chars", [(100, 1_000_000), (17, 1_000_000), (1000, 150)])
def test_text_too_short_for_its_split_says_how_much_is_needed(tmp_path, chars, max_chars):
    # the counts of the file as read (after max_chars), not those of a hidden 90/10 split
    path = tmp_path / "short.txt"
    path.write_text(("ab" * chars)[:chars], encoding="utf-8")
    with pytest.raises(DataError, match=f"{min(chars, max_chars):,} characters \\(max_chars {max_chars:,}\\) are too "
                                        "few for block_size 16 with a 10% test split: it needs about 171"):
        load_text(path, block_size=16, max_chars=max_chars)
    path.write_text("ab" * 86)  # 172 characters: enough
    assert len(load_text(path, block_size=16).test) == 1


@pytest.mark.parametrize("max_chars", range(100, 140))
def test_load_text_after_a_byte_order_mark_cuts_multibyte_characters_cleanly(tmp_path, max_chars):
    path = tmp_path / "bom.txt"
    text = "привет, world! " * 40
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    split = load_text(path, block_size=4, max_chars=max_chars)
    assert len(split.train.codes) + len(split.test.codes) == max_chars


def test_load_text_names_the_file_offset_of_a_bad_byte_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"ab" * 10 + b"\xff" + b"ab" * 100)
    with pytest.raises(DataError, match="at byte 23"):
        load_text(path, block_size=4)
    path.write_bytes(b"\xef\xbb\xbf" + b"ab" * 50 + b"\xff")  # past the 100 characters used
    assert load_text(path, block_size=4, max_chars=100).meta["vocab"] == "ab"


def test_load_text_refuses_a_test_fraction_outside_0_1(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("ab" * 1000)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_text(path, block_size=4, test_fraction=0)


def test_load_text_reads_line_ends_as_newlines(tmp_path):
    # as a file opened in text mode gives them: \r\n and \r are one "\n", not two characters
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"ab\r\ncd\rxy\n" * 100)
    split = load_text(path, block_size=8, max_chars=90)
    assert split.meta["vocab"] == "\nabcdxy"
    assert len(split.train.codes) + len(split.test.codes) == 90


def test_load_text_reads_only_max_chars_and_no_byte_order_mark(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + ("ab\n" * 200).encode() + b"\xff broken later")
    split = load_text(path, block_size=4, max_chars=300)  # the broken byte lies past what is used
    assert split.meta["vocab"] == "\nab"


def test_load_text_default_corpus():
    split = load_text(None, block_size=16, max_chars=20_000)
    assert split.meta["source"] == "python-stdlib"
    assert len(split.train) > 0 and len(split.test) > 0
    assert split.num_classes > 20
    text = "".join(split.meta["vocab"][c] for c in split.train.codes[:2000])
    assert "def " in text or "import " in text


# --- ShardSampler / BatchLoader --------------------------------------------------------------------------

SIZES = [10, 11, 17, 1797]
WORLDS = [1, 2, 3, 4, 5]


def _shards(n, world, drop_last, epoch=0, seed=7):
    out = []
    for rank in range(world):
        s = ShardSampler(n, rank, world, shuffle=True, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        out.append(s.indices())
    return out


@pytest.mark.parametrize("drop_last", [False, True], ids=["pad", "drop"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", SIZES)
def test_shards_cover_the_data_once(n, world, drop_last):
    for epoch in (0, 3):
        shards = _shards(n, world, drop_last, epoch)
        lengths = {len(s) for s in shards}
        assert len(lengths) == 1, f"ranks have shards of lengths {lengths}"
        (length,) = lengths
        assert all(len(ShardSampler(n, r, world, drop_last=drop_last)) == length for r in range(world))
        assert list(ShardSampler(n, 0, world, drop_last=drop_last, seed=7)) == \
            ShardSampler(n, 0, world, drop_last=drop_last, seed=7).indices().tolist()
        counts = Counter(np.concatenate(shards).tolist())
        assert all(0 <= i < n for i in counts)
        if drop_last:
            assert length == n // world
            assert len(counts) == n - n % world  # distinct indices
            assert max(counts.values()) == 1  # no repeats
        else:
            assert length == math.ceil(n / world)
            assert set(counts) == set(range(n))  # every index
            repeats = sum(c - 1 for c in counts.values())
            assert repeats == (-n) % world  # the fewest that make equal shards
            assert max(counts.values()) <= 2


@pytest.mark.parametrize("n", SIZES)
def test_set_epoch_reshuffles_deterministically_on_all_ranks(n):
    world = 3
    e0, e1, e0_again = _shards(n, world, False, 0), _shards(n, world, False, 1), _shards(n, world, False, 0)
    assert any(not np.array_equal(a, b) for a, b in zip(e0, e1)), "set_epoch did not change the order"
    for a, b in zip(e0, e0_again):
        np.testing.assert_array_equal(a, b)
    # the same sampler object, epochs set in any order
    s = ShardSampler(n, 1, world, seed=7)
    s.set_epoch(1)
    np.testing.assert_array_equal(s.indices(), e1[1])
    s.set_epoch(0)
    np.testing.assert_array_equal(s.indices(), e0[1])
    # every rank uses the same permutation: interleaving the shards gives the world_size=1 order
    for epoch, shards in ((0, e0), (1, e1)):
        single = ShardSampler(n, 0, 1, seed=7)
        single.set_epoch(epoch)
        interleaved = np.stack(shards, axis=1).reshape(-1)[:n]
        np.testing.assert_array_equal(interleaved, single.indices())
    other_seed = ShardSampler(n, 0, 1, seed=8).indices()
    assert not np.array_equal(other_seed, ShardSampler(n, 0, 1, seed=7).indices())


def test_no_shuffle_is_in_order():
    s = ShardSampler(10, 1, 3, shuffle=False)
    assert s.indices().tolist() == [1, 4, 7, 0]  # padded by repeating the start


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ShardSampler(10, 3, 3)
    with pytest.raises(ValueError):
        ShardSampler(10, 0, 0)
    with pytest.raises(ValueError):
        ShardSampler(2, 0, 3, drop_last=True)
    with pytest.raises(ValueError):
        ShardSampler(0, 0, 1)
    with pytest.raises(ValueError):
        BatchLoader(ArrayDataset(np.zeros(3), np.zeros(3)), 0)


def _index_dataset(n):
    return ArrayDataset(np.arange(n), np.arange(n) * 10)


@pytest.mark.parametrize("drop_last", [False, True], ids=["pad", "drop"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", SIZES)
def test_rank_batches_together_are_the_global_batch(n, world, drop_last):
    """Rank batches k together == batch k of one process with batch_size*world_size: what makes data-parallel
    training equal single-process training. Only the final batch differs, by the padding repeats (pad) or
    by the n % world tail that drop_last leaves out."""
    batch = 3
    epoch = 2
    ds = _index_dataset(n)
    loaders = [BatchLoader(ds, batch, ShardSampler(n, r, world, seed=5, drop_last=drop_last)) for r in range(world)]
    single = BatchLoader(ds, batch * world, ShardSampler(n, 0, 1, seed=5))
    rank_batches = [list(loader.batches(epoch)) for loader in loaders]
    single_batches = [x.tolist() for x, _ in single.batches(epoch)]
    assert len({len(b) for b in rank_batches}) == 1, "ranks run different numbers of steps"
    steps = len(rank_batches[0])
    assert steps == len(loaders[0])
    for r in range(world):
        for x, y in rank_batches[r]:
            np.testing.assert_array_equal(y, x * 10)  # inputs and targets stay paired
    perm = np.concatenate(single_batches).tolist()
    pad = (-n) % world
    seen = []
    for k in range(steps):
        union = sorted(i for r in range(world) for i in rank_batches[r][k][0].tolist())
        seen += union
        if len(union) == batch * world and (k + 1) * batch * world <= n:
            assert union == sorted(single_batches[k]), f"batch {k}"
    if n % world == 0:
        assert steps == len(single_batches)
        for k in range(steps):
            union = sorted(i for r in range(world) for i in rank_batches[r][k][0].tolist())
            assert union == sorted(single_batches[k])
    elif drop_last:
        assert sorted(seen) == sorted(perm[: n - n % world])  # the single order minus its tail
    else:
        assert sorted(seen) == sorted(perm + perm[:pad])  # the single order plus the fewest repeats
    assert sorted(set(seen)) == sorted(set(perm[: len(seen)] if drop_last else perm))


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_loader_resumes_mid_epoch(drop_last):
    n = 53
    ds = _index_dataset(n)
    loader = BatchLoader(ds, 5, ShardSampler(n, 1, 2, seed=3), drop_last=drop_last)
    shard = math.ceil(n / 2)
    assert len(loader) == (shard // 5 if drop_last else math.ceil(shard / 5))
    for epoch in (0, 1, 4):
        full = [x.tolist() for x, _ in loader.batches(epoch)]
        assert len(full) == len(loader)
        if not drop_last:
            assert sum(len(b) for b in full) == shard
        else:
            assert all(len(b) == 5 for b in full)
        for start in range(len(loader) + 1):
            resumed = [x.tolist() for x, _ in loader.batches(epoch, start)]
            assert resumed == full[start:], f"epoch {epoch} start {start}"
    # a fresh loader (a resumed process) gives the same batches as one that ran earlier epochs
    fresh = BatchLoader(ds, 5, ShardSampler(n, 1, 2, seed=3), drop_last=drop_last)
    assert [x.tolist() for x, _ in fresh.batches(4, 2)] == [x.tolist() for x, _ in loader.batches(4)][2:]


def test_batch_loader_default_sampler_in_order():
    loader = BatchLoader(_index_dataset(7), 3)
    assert [x.tolist() for x, _ in loader] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("key,array,dtype,words", [
    ("train_y", np.array([-1, 0, 1] * 32), np.int8, "train labels must be integers >= 0"),
    ("train_y", np.linspace(0, 9.9, 96), np.float32, "train labels must be integers >= 0, got float32"),
    ("test_y", np.full(40, 200), np.uint8, "t10k labels go up to 200, beyond the train labels' 0..9"),
    ("train_x", np.random.default_rng(0).random((96, 6, 5)), np.float32, "train images are float32, not unsigned"),
    ("test_x", np.zeros((40, 4, 4)), np.uint8, "t10k images are (4, 4) but train images (6, 5)"),
    ("test_x", np.zeros((0, 6, 5)), np.uint8, "the t10k files hold no images"),
], ids=["negative-labels", "float-labels", "test-label-beyond", "float-images", "other-size", "empty-test"])
def test_idx_files_that_would_train_on_wrong_data_are_refused(tmp_path, key, array, dtype, words):
    make_mnist_dir(tmp_path / "d")
    if key == "test_x" and len(array) == 0:
        write_idx(tmp_path / "d" / MNIST_NAMES["test_y"], np.zeros(0), np.uint8)
    write_idx(tmp_path / "d" / MNIST_NAMES[key], array, dtype)
    with pytest.raises(DataError, match=re.escape(words)):
        load_idx_dir(tmp_path / "d")


def test_an_idx_header_whose_size_overflows_is_refused(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31))
    with pytest.raises(DataError, match="header says"):
        read_idx(path)


def test_a_small_gzip_file_that_expands_past_its_header_is_refused_without_expanding_it(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 4, 4)  # 32 bytes of data declared
    path.write_bytes(gzip.compress(header + bytes(64 * 2**20), 9))  # 64 MB follow: a file of 64 KB
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"header says \(2, 4, 4\) \(32 bytes of data\) but the file holds more"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # the whole file was decompressed into memory first


def test_the_data_fingerprint_reads_the_data_only_and_not_its_byte_order():
    from distbp.data.datasets import fingerprint

    split = load_text(None, block_size=8, max_chars=5000)
    other = load_text(None, block_size=8, max_chars=5000)
    other.train._offsets = other.train._offsets.astype(np.int32)  # a helper array, int32 on some platforms
    assert fingerprint(split) == fingerprint(other)
    digits, swapped = load_digits(), load_digits()
    swapped.train.x = swapped.train.x.astype(">f4")
    assert fingerprint(digits) == fingerprint(swapped)
    reordered = load_digits()
    reordered.train.y = reordered.train.y[::-1].copy()
    assert fingerprint(digits) != fingerprint(reordered)


def test_plain_files_beside_the_gz_files_they_came_from_load(tmp_path):
    # torchvision's MNIST/raw keeps both; so does gunzip -k
    arrays = make_mnist_dir(tmp_path / "d", compress=True)
    for stem in MNIST_NAMES.values():
        (tmp_path / "d" / stem).write_bytes(gzip.decompress((tmp_path / "d" / (stem + ".gz")).read_bytes()))
    split = load_idx_dir(tmp_path / "d", images=False)
    np.testing.assert_array_equal(split.train.y, arrays["train_y"])


@pytest.mark.parametrize("case, words", [
    ("plain-and-gz", "both train-labels-idx1-ubyte and train-labels-idx1-ubyte.gz, and they differ: keep one"),
    ("broken-link", "train-labels-idx1-ubyte is a broken symbolic link"),
    ("broken-link-beside-the-gz", "train-labels-idx1-ubyte is a broken symbolic link"),  # not "they differ"
    ("empty", "the file is empty"),
    ("one-class", "every train label is 3: a classifier needs two classes or more"),
    ("huge-label", "train labels go up to 1900000000; at most 1,048,576 classes"),
    ("no-pixels", "train images are 0x5 pixels"),
])
def test_idx_directories_that_cannot_train_are_refused_in_one_line(tmp_path, case, words):
    d = tmp_path / "d"
    make_mnist_dir(d)
    labels = d / MNIST_NAMES["train_y"]
    if case == "plain-and-gz":
        write_idx(d / (MNIST_NAMES["train_y"] + ".gz"), (np.arange(96) + 1) % 10, compress=True)
    elif case.startswith("broken-link"):
        if case == "broken-link-beside-the-gz":
            write_idx(d / (MNIST_NAMES["train_y"] + ".gz"), np.arange(96) % 10, compress=True)
        labels.unlink()
        labels.symlink_to(tmp_path / "gone")
    elif case == "empty":
        labels.write_bytes(b"")
    elif case == "one-class":
        write_idx(labels, np.full(96, 3))
    elif case == "huge-label":
        write_idx(labels, np.arange(96) * 20_000_000, np.dtype(">i4"))
    else:
        write_idx(d / MNIST_NAMES["train_x"], np.zeros((96, 0, 5)))
    with pytest.raises(DataError, match=re.escape(words)):
        load_idx_dir(d)


def test_a_huge_max_chars_reads_a_small_text_file_without_asking_for_the_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "small.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    tracemalloc.start()
    try:
        split = load_text(path, block_size=8, max_chars=10**11)  # read(4e11 bytes) ran out of memory
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(split.train) + len(split.test) > 0 and peak < 64 * 2**20, peak


def test_an_empty_text_file_is_named_empty(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="text file .*empty.txt is empty"):
        load_text(tmp_path / "empty.txt")


def test_a_run_is_not_resumed_on_other_data_of_the_same_shapes(tmp_path):
    # Fashion-MNIST for MNIST, say: it resumed silently (data_dir is a path, which may move, so not a setting)
    from distbp.train import CheckpointError, Trainer, make_config

    make_mnist_dir(tmp_path / "first", seed=0)
    make_mnist_dir(tmp_path / "other", seed=1)
    ckpt = str(tmp_path / "run.ckpt")
    base = {"dataset": "idx", "epochs": 2, "checkpoint": ckpt, "progress": "none"}
    Trainer(make_config({**base, "data_dir": str(tmp_path / "first"), "max_steps": 2})).fit()
    with pytest.raises(CheckpointError, match="written on other training data"):
        Trainer(make_config({**base, "data_dir": str(tmp_path / "other"), "resume": True})).fit()
    shutil.copytree(tmp_path / "first", tmp_path / "moved")  # the same data elsewhere: resumed
    again = Trainer(make_config({**base, "data_dir": str(tmp_path / "moved"), "resume": True, "max_steps": 3}))
    again.fit()
    assert again.step == 3


def test_a_tiny_synthetic_data_set_keeps_a_test_split():
    split = load_synthetic(5)
    assert len(split.test) >= 1 and len(split.train) >= 1


def test_initialisation_data_order_and_dropout_draw_from_different_generators():
    # numpy pads a seed with zeros: default_rng(s) is default_rng([s, 0]), so a sampler seeded [seed, epoch]
    # drew epoch 0's order from the initialisation's bits, and rank r's dropout [seed, 1 + r] epoch r+1's
    from distbp.autograd import get_rng_state
    from distbp.train import Trainer, make_config

    n, seed = 200, 3
    trainer = Trainer(make_config(dict(dataset="synthetic", synthetic_size=n, seed=seed, progress="none")))
    dropout = np.random.default_rng()
    dropout.bit_generator.state = get_rng_state()  # rank 0's dropout generator, as the trainer left it
    orders = {"initialisation": np.random.default_rng(seed).permutation(len(trainer.split.train)),
              "dropout": dropout.permutation(len(trainer.split.train))}
    sampler = trainer.loader.sampler
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders[f"epoch {epoch}"] = sampler.indices()
    same = [(a, b) for a in orders for b in orders if a < b and np.array_equal(orders[a], orders[b])]
    assert not same, f"one generator behind {same}"
