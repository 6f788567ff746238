"""Data for data-parallel training: per-rank sharding and download-free datasets."""

from gradsync.data.datasets import (
    CharSequenceDataset,
    load_digits,
    split_corpus,
    stdlib_char_datasets,
    stdlib_text_corpus,
    synthetic_classification,
)
from gradsync.data.sampler import ShardedSampler

__all__ = [
    "CharSequenceDataset",
    "ShardedSampler",
    "load_digits",
    "split_corpus",
    "stdlib_char_datasets",
    "stdlib_text_corpus",
    "synthetic_classification",
]
