"""Top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD with
Memory"; Lin et al. 2018, "Deep Gradient Compression").

Per bucket, each rank adds the residual it kept from earlier steps to its gradients, sends
only the k = ceil(ratio * numel) entries of largest magnitude (values and their int64
indices, one all-gather each) and keeps the rest as the next residual. Nothing is lost, only
delayed: over any run, what a rank sent plus its residual equals the sum of its gradients,
which is why top-k SGD still converges at ratios of 0.1 to 0.001.

All ranks have the same k, so the all-gathers have equal sizes. Every rank rebuilds the same
dense average: rank 0's values scattered first, then rank 1's, ..., so the sum is bitwise the
same on every rank. :func:`naive_topk_hook` beside it masks the dense bucket and all-reduces
it: the oracle for the sparse exchange, and with two ranks bitwise equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import comm
from .bucket import GradBucket, Timer, bus_bytes
from .default import HookState

INDEX_BYTES = 8  # int64 indices: torch.topk's and index_add_'s own dtype, no conversion


@dataclass
class TopKState(HookState):
    """:class:`HookState` plus the ratio and this rank's residual per bucket index."""

    ratio: float = 0.01
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)
    """bucket index -> (numel,) the gradient mass not sent yet, in the bucket's dtype."""

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"the top-k ratio must be in (0, 1], got {self.ratio}")


def topk(ratio: float, group: comm.Group | None = None,
         algorithm: str = "auto") -> tuple[TopKState, Callable]:
    """(state, hook) for ``DataParallel.register_comm_hook`` sending the top ``ratio`` of
    each bucket with error feedback.

    Args:
        ratio: fraction of each bucket's entries sent per step, in (0, 1]; 1 sends all.
        group: the ranks to average over (default: the bucket's, i.e. DataParallel's).
        algorithm: the all-reduce algorithm of :func:`naive_topk_hook` (the sparse hook
            all-gathers on the engine).
    Raises:
        ValueError: ``ratio`` outside (0, 1].
    """
    return TopKState(group, algorithm, ratio=ratio), topk_hook


def topk_count(numel: int, ratio: float) -> int:
    """k = ceil(ratio * numel), at least 1 and at most ``numel``.

    ``ratio * numel`` is rounded to 9 digits first: 0.1 * 30 is 3.0000000000000004 in
    binary floating point, and its ceiling would send 4 entries instead of 3.
    """
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(ratio * numel, 9))))


def _accumulate(state: TopKState, bucket: GradBucket) -> torch.Tensor:
    """(numel,) this step's gradients plus the residual: a new tensor, so the caller may
    zero the sent entries in it and keep it as the next residual."""
    buf = bucket.buffer()
    residual = state.residuals.get(bucket.index())
    if residual is None:
        return buf.clone()
    if residual.shape != buf.shape or residual.dtype != buf.dtype:
        raise RuntimeError(f"bucket {bucket.index()} changed from {residual.dtype}"
                           f"{list(residual.shape)} to {buf.dtype}{list(buf.shape)}; a "
                           "TopKState serves one model's buckets")
    return buf + residual


def select(acc: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) int64 indices of the k largest |acc|, unsorted.

    torch.topk on the CPU returns the same indices for the same input, ties included, so the
    sparse hook and its dense oracle pick the same entries (NaN counts as the largest: a
    non-finite gradient is sent, not hidden in the residual, and DataParallel reports it).
    """
    return acc.abs().topk(k, sorted=False).indices


def topk_hook(state: TopKState, bucket: GradBucket) -> comm.Work:
    """Average ``bucket`` from every rank's top-k entries; the handle's ``wait()`` leaves the
    average in the bucket and returns it."""
    group = state.resolve(bucket)
    n, buf = group.size, bucket.buffer()  # buf: (numel,)
    k = topk_count(buf.numel(), state.ratio)
    with Timer(state.stats):
        acc = _accumulate(state, bucket)  # (numel,)
        idx = select(acc, k)              # (k,) int64
        values = acc[idx]                 # (k,) bucket dtype
        acc[idx] = 0                      # what was not sent waits for the next step
        state.residuals[bucket.index()] = acc
    state.stats.buckets += 1
    # all_gather bus bytes: (n-1)/n of the gathered (n, k) values and indices.
    state.stats.bytes_sent += (n - 1) * k * (buf.element_size() + INDEX_BYTES)
    state.stats.bytes_dense += bus_bytes(buf.numel() * buf.element_size(), n)
    all_values = [torch.empty_like(values) for _ in range(n)]  # n x (k,)
    all_indices = [torch.empty_like(idx) for _ in range(n)]    # n x (k,)
    values_work = comm.all_gather_async(all_values, values, group=group)
    indices_work = comm.all_gather_async(all_indices, idx, group=group)

    def decompress(done: comm.Work) -> torch.Tensor:
        values_work.wait()
        with Timer(state.stats):
            # The bucket's own gradients are in acc already: reuse it for the average.
            buf.zero_()
            for v, i in zip(all_values, all_indices):  # rank order on every rank
                # Divide each rank's values before adding them: as in the dense all-reduce,
                # a half-precision sum (under cast_wrapper) then cannot overflow.
                buf.index_add_(0, i, v / n)
        return buf

    return indices_work.then(decompress)


def naive_topk_hook(state: TopKState, bucket: GradBucket) -> comm.Work:
    """The oracle of :func:`topk_hook`: the same selection and residual, but the dense
    bucket with everything outside the top-k zeroed is all-reduced (blocking).

    With two ranks the result is bitwise that of :func:`topk_hook` (a/2 + b/2 either way);
    with more, the all-reduce may add in another order.
    """
    group = state.resolve(bucket)
    n, buf = group.size, bucket.buffer()
    k = topk_count(buf.numel(), state.ratio)
    acc = _accumulate(state, bucket)
    idx = select(acc, k)
    mask = torch.zeros_like(acc, dtype=torch.bool)  # (numel,) True on the top-k
    mask[idx] = True
    sent = torch.where(mask, acc, torch.zeros_like(acc))  # (numel,) dense
    state.residuals[bucket.index()] = torch.where(mask, torch.zeros_like(acc), acc)
    state.stats.buckets += 1
    state.stats.bytes_sent += bus_bytes(buf.numel() * buf.element_size(), n)
    state.stats.bytes_dense += bus_bytes(buf.numel() * buf.element_size(), n)
    sent.div_(n)
    comm.all_reduce(sent, op="sum", group=group, algorithm=state.algorithm)
    buf.copy_(sent)
    return comm.Work(lambda: buf)
