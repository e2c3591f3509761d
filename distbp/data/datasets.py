"""Data sets as in-memory arrays: digits (shipped by scikit-learn), MNIST-format IDX files, a text corpus,
and synthetic data. Every data set is a pair of arrays fetched by a batch of indices at a time.
"""

import codecs
import gzip
import math
import os
import struct
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from ..serialization import MAX_DIMENSIONS, not_a_regular_file, too_large_for_an_array


class DataError(ValueError):
    """A data file or data set that cannot be used, with the reason."""


class ArrayDataset:
    """Inputs and targets held as arrays; `ds[indices]` gives a batch (x, y)."""

    def __init__(self, x, y, name="arrays"):
        if len(x) != len(y):
            raise DataError(f"{name}: {len(x)} inputs but {len(y)} targets")
        self.x, self.y, self.name = x, y, name

    def __len__(self):
        return len(self.x)

    def __getitem__(self, indices):
        return self.x[indices], self.y[indices]


class Split:
    """A train and a test ArrayDataset plus what a model needs to know about them."""

    def __init__(self, train, test, input_shape, num_classes, meta=None):
        self.train, self.test = train, test
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.meta = meta or {}


def fingerprint(split):
    """A short digest of a split's training data (each data array's name, shape and type, and its values,
    sampled evenly when large, as little-endian bytes): a run resumed on other data of the same shapes
    (Fashion-MNIST for MNIST, another text with the same characters) is told apart by it. The sample keeps
    it to a few milliseconds; it is computed once per split (thread ranks share theirs)."""
    cached = getattr(split, "_fingerprint", None)
    if cached is not None:
        return cached
    digest = 0
    for name, value in sorted(vars(split.train).items()):
        if isinstance(value, np.ndarray) and not name.startswith("_"):  # the data, not helper arrays
            flat = value.reshape(-1)
            sample = flat[::max(flat.size // (1 << 22), 1)]
            sample = np.ascontiguousarray(sample, sample.dtype.newbyteorder("<"))
            digest = zlib.crc32(f"{name}{value.shape}{value.dtype.kind}{value.dtype.itemsize}".encode(), digest)
            digest = zlib.crc32(sample.view(np.uint8), digest)
    split._fingerprint = f"{len(split.train)}:{digest:08x}"
    return split._fingerprint


def read_only(split):
    """The split with its arrays made read-only: ranks that share one (the threads backend loads the data
    once) cannot change it under each other. Returns the split."""
    for dataset in (split.train, split.test):
        for value in vars(dataset).values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
    return split


def _split(x, y, test_fraction, seed, name, input_shape, num_classes, meta=None):
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(int(round(len(x) * test_fraction)), 1)  # every data set keeps a test split of its own
    test, train = order[:n_test], order[n_test:]
    return Split(ArrayDataset(x[train], y[train], f"{name}/train"), ArrayDataset(x[test], y[test], f"{name}/test"),
                 input_shape, num_classes, meta)


# --- digits --------------------------------------------------------------------------------------------


def load_digits(test_fraction=0.2, seed=0, images=False):
    """The 1,797 8x8 handwritten digits that scikit-learn ships, pixels scaled to [0, 1].

    images=False gives flat (N, 64) inputs, images=True (N, 1, 8, 8). The split is a fixed permutation.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    shape = (1, 8, 8) if images else (64,)
    return _split(x.reshape((-1,) + shape), y, test_fraction, seed, "digits", shape, 10)


# --- MNIST-format IDX files ------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


MAX_CLASSES = 1 << 20


def read_idx(path):
    """Read an IDX file (gzip or plain) into an array; a malformed file raises DataError naming it.

    The header is read first and then no more data than it declares (and one byte, to find extra data): a
    small gzip file that expands to gigabytes is refused without expanding it."""
    path = Path(path)
    what = not_a_regular_file(path)
    if what:
        raise DataError(f"IDX file {path} is not a regular file ({what})")
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gzipped else f
            try:
                return _read_idx_stream(path, stream)
            except (OSError, EOFError, zlib.error) as e:
                if not gzipped:
                    raise
                raise DataError(f"{path}: corrupt gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None


def _read_idx_stream(path, stream):
    head = stream.read(4)
    if not head:
        raise DataError(f"{path}: the file is empty (an IDX file expected)")
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = head[2], head[3]
    if type_code not in _IDX_TYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    if ndim > MAX_DIMENSIONS:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions (at most {MAX_DIMENSIONS})")
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a crafted header must not wrap around
    data = bytearray()
    while len(data) <= expected:  # at most one byte past what the header declares
        piece = stream.read(min(expected + 1 - len(data), 1 << 24))
        if not piece:
            break
        data += piece
    if len(data) != expected:
        held = f"{len(data)}" if len(data) < expected else f"more than {expected}"
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes of data) but the file holds {held}")
    if too_large_for_an_array(dims, dtype.itemsize):
        raise DataError(f"{path}: IDX header declares {list(dims)}, too large for an array")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _find(directory, stem):
    names = (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")
    found = [directory / name for name in names if os.path.lexists(directory / name)]
    if not found:
        raise DataError(f"{directory}: no {stem} or {stem}.gz (MNIST-format IDX files expected)")
    broken = [path for path in found if not path.exists()]  # symbolic links to nothing
    if broken:
        raise DataError(f"{broken[0]} is a broken symbolic link")
    files = [path for path in found if not path.is_dir()] or found  # (a directory alone: read_idx names it)
    if len(files) > 1 and not _same_data(files[0], files[1]):
        # an old plain file would win silently over a newer .gz (a plain file beside the .gz it came from,
        # as torchvision keeps them, is the same data and is read)
        raise DataError(f"{directory}: both {files[0].name} and {files[1].name}, and they differ: keep one")
    return files[0]


def _same_data(first, second):
    """Whether two candidate files hold the same IDX bytes once decompressed (compared a piece at a time)."""
    def opened(f):
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        return gzip.GzipFile(fileobj=f) if gzipped else f

    try:
        with open(first, "rb") as f1, open(second, "rb") as f2:
            a, b = opened(f1), opened(f2)
            while True:
                piece = a.read(1 << 20)
                if piece != b.read(1 << 20):
                    return False
                if not piece:
                    return True
    except (OSError, EOFError, zlib.error):
        return False  # one cannot be read: named as differing, then read_idx says what is wrong


def load_idx_dir(directory, images=True):
    """MNIST or Fashion-MNIST from a directory holding the four standard IDX files (gzip or plain)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} {'is not a directory' if directory.exists() else 'does not exist'}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{directory}: {prefix} images must be 3-d and labels 1-d, got {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{directory}: {len(x)} {prefix} images but {len(y)} labels")
        if not len(x):
            raise DataError(f"{directory}: the {prefix} files hold no images")
        if not x[0].size:
            raise DataError(f"{directory}: {prefix} images are {x.shape[1]}x{x.shape[2]} pixels")
        if x.dtype != np.uint8:  # pixels are scaled from 0..255
            raise DataError(f"{directory}: {prefix} images are {x.dtype.name}, not unsigned bytes (0-255)")
        if y.dtype.kind not in "iu" or y.min() < 0:
            raise DataError(f"{directory}: {prefix} labels must be integers >= 0, got {y.dtype.name} "
                            f"from {y.min()} to {y.max()}")
        parts[split] = (x, y)
    h, w = parts["train"][0].shape[1:]
    if parts["test"][0].shape[1:] != (h, w):
        raise DataError(f"{directory}: t10k images are {parts['test'][0].shape[1:]} but train images {(h, w)}")
    shape = (1, h, w) if images else (h * w,)
    num_classes = int(parts["train"][1].max()) + 1
    if len(np.unique(parts["train"][1])) < 2:
        raise DataError(f"{directory}: every train label is {num_classes - 1}: a classifier needs two classes or more")
    if num_classes > MAX_CLASSES:  # the output layer would have a row per class up to the largest label
        raise DataError(f"{directory}: train labels go up to {num_classes - 1}; at most {MAX_CLASSES:,} classes "
                        "(labels 0..N-1) are supported")
    if parts["test"][1].max() >= num_classes:
        raise DataError(f"{directory}: t10k labels go up to {parts['test'][1].max()}, beyond the train labels' "
                        f"0..{num_classes - 1}")

    def make(x, y, name):
        return ArrayDataset((x.astype(np.float32) / 255.0).reshape((-1,) + shape), y.astype(np.int64), name)

    return Split(make(*parts["train"], "idx/train"), make(*parts["test"], "idx/test"), shape, num_classes)


# --- text ----------------------------------------------------------------------------------------------


def stdlib_text(max_chars=1_000_000):
    """The running interpreter's own standard-library sources: a real text every Python install has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not chunks:
        raise DataError(f"no Python sources found under {root}")
    return "".join(chunks)[:max_chars]


class CharDataset:
    """Next-character prediction over consecutive, non-overlapping windows of the text.

    Item i is (codes[s:s+block], codes[s+1:s+block+1]) with s = i * block_size, as integer codes: one
    epoch reads the text once.
    """

    def __init__(self, codes, block_size, name="text"):
        if len(codes) <= block_size:
            raise DataError(f"{name}: the text has {len(codes)} characters, fewer than block_size+1={block_size + 1}")
        self.codes, self.block_size, self.name = codes, block_size, name
        self._offsets = np.arange(block_size + 1)

    def __len__(self):
        return (len(self.codes) - 1) // self.block_size

    def __getitem__(self, indices):
        rows = self.codes[np.asarray(indices)[:, None] * self.block_size + self._offsets]
        return rows[:, :-1], rows[:, 1:]


def _read_utf8_prefix(path, max_chars):
    """The first max_chars characters of a UTF-8 file, reading no more than they can take (4 bytes each):
    only what is used must decode, a byte-order mark is not text, and line ends read as "\n" (as a file
    opened in text mode gives them)."""
    what = not_a_regular_file(path, pipe_ok=True)
    if what:
        raise DataError(f"text file {path} is not a regular file or a pipe ({what})")
    wanted = 4 * max_chars + 3
    pieces, held = [], 0
    with open(path, "rb") as f:
        while held < wanted:  # in pieces: read(n) allocates n bytes at once (a huge max_chars ran out of memory)
            piece = f.read(min(wanted - held, 1 << 24))
            if not piece:
                break
            pieces.append(piece)
            held += len(piece)
    raw = b"".join(pieces)
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    raw = raw[skip:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw[:e.start].decode("utf-8")  # what decodes, up to the first bad byte
        if len(_universal_newlines(text)) < max_chars:  # else it lies past what is used (or cuts a character)
            raise DataError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start + skip})") from None
    return _universal_newlines(text)[:max_chars]


def _universal_newlines(text):
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(path=None, block_size=64, test_fraction=0.1, max_chars=1_000_000):
    """A character-level corpus: the file at `path` (UTF-8), or the standard library's sources."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"load_text: test_fraction must be in (0, 1), got {test_fraction}")
    if path is None:
        text, source = stdlib_text(max_chars), "python-stdlib"
    else:
        try:
            text = _read_utf8_prefix(path, max_chars)
        except FileNotFoundError:
            raise DataError(f"text file {path} does not exist") from None
        except OSError as e:
            raise DataError(f"cannot read text file {path}: {e.strerror}") from None
        source = os.fspath(path)
    vocab = sorted(set(text))
    if not text:
        raise DataError(f"text file {source} is empty")
    if len(vocab) < 2:
        raise DataError(f"text from {source} has fewer than two distinct characters")
    lookup = np.zeros(max(map(ord, vocab)) + 1, np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    codes = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    cut = int(len(codes) * (1 - test_fraction))
    if min(cut, len(codes) - cut) <= block_size:
        needed = math.ceil((block_size + 1) / min(test_fraction, 1 - test_fraction)) + 1
        raise DataError(f"text from {source}: {len(codes):,} characters (max_chars {max_chars:,}) are too few for "
                        f"block_size {block_size} with a {test_fraction:.0%} test split: it needs about "
                        f"{needed:,}")
    train = CharDataset(codes[:cut], block_size, f"{source}/train")
    test = CharDataset(codes[cut:], block_size, f"{source}/test")
    return Split(train, test, (block_size,), len(vocab), {"vocab": "".join(vocab), "source": source})


# --- synthetic -----------------------------------------------------------------------------------------


def load_synthetic(n=10_000, features=784, classes=10, test_fraction=0.1, seed=0, images=False):
    """Gaussian clusters around random class centres: learnable, any size, no files. Each feature has unit
    variance, so the models' default learning rates suit it as they suit the digits."""
    if n < 2 or features < 1 or classes < 2:
        raise DataError(f"synthetic data needs n >= 2, features >= 1, classes >= 2 (got {n}, {features}, {classes})")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.standard_normal((n, features), dtype=np.float32) * 2.0) / np.float32(5 ** 0.5)
    shape = (features,)
    if images:
        side = int(round(features**0.5))
        if side * side != features:
            raise DataError(f"synthetic images need a square number of features, got {features}")
        shape = (1, side, side)
    return _split(x.reshape((-1,) + shape), y.astype(np.int64), test_fraction, seed, "synthetic", shape, classes)
