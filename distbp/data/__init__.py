"""Data sets (digits, MNIST-format IDX files, text corpora, synthetic), a sharding sampler and a batch loader."""

from .datasets import (
    ArrayDataset, CharDataset, DataError, Split, load_digits, load_idx_dir, load_synthetic, load_text,
    read_idx, stdlib_text,
)
from .sampler import BatchLoader, ShardSampler
