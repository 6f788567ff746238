"""Datasets that need no download: everything here ships with the installed packages.

* `load_digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).
* `stdlib_text_corpus` + `CharSequenceDataset`: byte-level language modelling on the
  source of the Python standard library of the running interpreter. The corpus depends on
  the exact Python version, so compare language-model numbers only on the same Python.
* `synthetic_classification`: random tensors of a fixed shape, for throughput only.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..env import cache_dir

# Directories of the standard library tree that are not part of the corpus: installed
# third-party packages (they differ between machines) and test suites (huge, repetitive).
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def load_digits(
    seed: int = 0, test_fraction: float = 0.2, images: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """Load scikit-learn's digits, split into a stratified train and test set.

    Args:
        seed: `random_state` of the split; the same seed gives the same split.
        test_fraction: fraction of samples held out for testing, in (0, 1).
        images: return features as images `(N, 1, 8, 8)` for a CNN instead of
            flat vectors `(N, 64)`.

    Returns:
        `(train, test)` TensorDatasets of `(features float32 in [0, 1], labels int64)`.

    Raises:
        ValueError: if `test_fraction` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pixels, target, train_idx, test_idx = _digits_split(seed, test_fraction)
    # Pixel values are integers 0..16; divide so features lie in [0, 1].
    features = torch.as_tensor(pixels, dtype=torch.float32) / 16.0  # (N, 64)
    labels = torch.as_tensor(target, dtype=torch.int64)  # (N,)
    if images:
        features = features.reshape(-1, 1, 8, 8)  # (N, 1, 8, 8), row-major like sklearn
    train_idx_t = torch.as_tensor(train_idx)
    test_idx_t = torch.as_tensor(test_idx)
    return (
        TensorDataset(features[train_idx_t], labels[train_idx_t]),
        TensorDataset(features[test_idx_t], labels[test_idx_t]),
    )


def _digits_split(seed: int, test_fraction: float):
    """(pixels (N, 64), target (N,), train indices, test indices) as numpy arrays.

    scikit-learn takes about a second to import, paid by every worker process of every
    digits run; the arrays it gives are the same every time, so the first call keeps them
    in a small .npz (``$GRADSYNC_CACHE``, default ~/.cache/gradsync) and later ones read
    that, without pickles. An unwritable cache only costs the import again.
    """
    import numpy as np

    path = os.path.join(cache_dir(), f"digits-seed{seed}-test{test_fraction!r}.npz")
    try:
        with np.load(path, allow_pickle=False) as cached:
            return (cached["pixels"], cached["target"], cached["train_idx"],
                    cached["test_idx"])
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    # Stratified so each class keeps its share in both halves, which keeps the small
    # test set (360 samples at the default fraction) representative.
    train_idx, test_idx = train_test_split(np.arange(len(bunch.target)),
                                           test_size=test_fraction, random_state=seed,
                                           stratify=bunch.target)
    arrays = {"pixels": bunch.data, "target": bunch.target, "train_idx": train_idx,
              "test_idx": test_idx}
    try:  # written aside, then renamed: a reader never sees half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError:
        pass
    return bunch.data, bunch.target, train_idx, test_idx


def stdlib_text_corpus(max_bytes: int = 2_000_000) -> bytes:
    """Concatenate the standard library's `*.py` sources, in sorted path order.

    Files are read from the directory of the `os` module, skipping `site-packages`,
    `dist-packages`, test directories and `__pycache__`. The last file is cut so the
    result is exactly `max_bytes` long when the library is larger than that.

    Args:
        max_bytes: maximum length of the result, >= 1.

    Returns:
        The corpus as raw bytes (mostly ASCII, some UTF-8).

    Raises:
        ValueError: if `max_bytes < 1`.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    root = os.path.dirname(os.__file__)
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped directories.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                paths.append(os.path.normpath(os.path.join(rel_dir, name)))
    # Sort relative paths with "/" separators so the order (and so the corpus) is the
    # same wherever the interpreter is installed.
    paths.sort(key=lambda p: p.replace(os.sep, "/"))

    chunks: list[bytes] = []
    size = 0
    for rel_path in paths:
        with open(os.path.join(root, rel_path), "rb") as f:
            chunk = f.read(max_bytes - size)
        chunks.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    return b"".join(chunks)


def split_corpus(data: bytes, val_fraction: float = 0.1) -> tuple[bytes, bytes]:
    """Split a corpus into a leading training part and a trailing validation part.

    Args:
        data: the corpus.
        val_fraction: share of bytes at the end used for validation, in (0, 1).

    Returns:
        `(train_bytes, val_bytes)`.

    Raises:
        ValueError: if `val_fraction` is not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = len(data) - int(len(data) * val_fraction)
    return data[:cut], data[cut:]


class CharSequenceDataset(Dataset[tuple[Tensor, Tensor]]):
    """Non-overlapping windows of byte tokens for next-token prediction (vocab 256).

    Item `i` is `(x, y)` with `x = tokens[i*c : (i+1)*c]` and `y = tokens[i*c+1 :
    (i+1)*c+1]`, both int64 of shape `(c,)`, where `c = context`. Windows do not
    overlap, so one epoch reads each byte once as input.

    Args:
        data: the text as bytes; each byte is one token.
        context: window length, >= 1.

    Raises:
        ValueError: if `context < 1` or `data` holds fewer than `context + 1` bytes.
    """

    def __init__(self, data: bytes, context: int) -> None:
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        if len(data) < context + 1:
            raise ValueError(f"need at least context + 1 = {context + 1} bytes, got {len(data)}")
        self.context = context
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        # The target of the last window needs one byte past it, hence the - 1.
        self.num_windows = (len(data) - 1) // context

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self.num_windows <= index < self.num_windows:
            raise IndexError(f"index {index} out of range for {self.num_windows} windows")
        start = (index % self.num_windows) * self.context
        x = self.tokens[start : start + self.context]  # (c,)
        y = self.tokens[start + 1 : start + self.context + 1]  # (c,), shifted by one
        return x, y


def stdlib_char_datasets(
    context: int = 64, max_bytes: int = 2_000_000, val_fraction: float = 0.1
) -> tuple[CharSequenceDataset, CharSequenceDataset]:
    """Byte-level train and validation sets over the standard library corpus.

    Args:
        context: window length in bytes.
        max_bytes: corpus size passed to `stdlib_text_corpus`.
        val_fraction: trailing share of the corpus held out for validation.

    Returns:
        `(train, val)` CharSequenceDatasets.
    """
    train_bytes, val_bytes = split_corpus(stdlib_text_corpus(max_bytes), val_fraction)
    return CharSequenceDataset(train_bytes, context), CharSequenceDataset(val_bytes, context)


def synthetic_classification(n: int, in_features: int, classes: int, seed: int) -> TensorDataset:
    """Random features and labels of a fixed shape, for throughput benchmarks only.

    The labels are independent of the features, so nothing here can be learned.

    Args:
        n: number of samples.
        in_features: feature width.
        classes: number of classes.
        seed: seed of a private generator; the global RNG is left untouched.

    Returns:
        TensorDataset of `(features float32 (n, in_features), labels int64 (n,))`.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, in_features, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(features, labels)
