"""Half-precision gradients on the wire: fp16 or bf16 (DDP's ``fp16_compress_hook``).

Each bucket is divided by the world size, cast to the half dtype, summed by one all-reduce
and cast back into the bucket: half the bytes of a float32 all-reduce for a rounding error of
about 2^-11 (fp16) or 2^-8 (bf16) relative per element. :func:`cast_wrapper` puts the same
casts around any other hook (e.g. bf16 around top-k), as torch's ``bf16_compress_wrapper``.

:func:`naive_cast_average` beside them is the oracle the tests check the hook against: the
same arithmetic on every rank's tensor at once, in one process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .. import comm
from .bucket import GradBucket, Timer, bus_bytes, result_tensor
from .default import HookState

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def half_dtype(name: str) -> torch.dtype:
    """The dtype ``fp16`` or ``bf16`` stands for; ValueError for any other name."""
    try:
        return HALF_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown half-precision cast {name!r}; choose one of "
                         f"{', '.join(HALF_DTYPES)}") from None


@dataclass
class CastState(HookState):
    """:class:`HookState` plus the dtype the buckets travel in."""

    dtype: torch.dtype = torch.float16


def cast(name: str, group: comm.Group | None = None,
         algorithm: str = "auto") -> tuple[CastState, Callable]:
    """(state, hook) for ``DataParallel.register_comm_hook`` sending ``name`` (fp16|bf16).

    Args:
        name: ``fp16`` or ``bf16``.
        group: the ranks to average over (default: the bucket's, i.e. DataParallel's).
        algorithm: the all-reduce algorithm for the half tensors.
    Raises:
        ValueError: unknown ``name``.
    """
    return CastState(group, algorithm, dtype=half_dtype(name)), cast_hook


def cast_hook(state: CastState, bucket: GradBucket) -> comm.Work:
    """Average ``bucket`` through a half-precision all-reduce; the handle's ``wait()`` leaves
    the average (float again) in the bucket and returns it."""
    group = state.resolve(bucket)
    buf = bucket.buffer()  # (numel,) this rank's own gradients, e.g. float32
    with Timer(state.stats):
        # Divide before the sum so n ranks' fp16 values cannot overflow 65504 together (the
        # reason DDP's allreduce path divides first), and before the cast: a gradient up to
        # n * 65504 still fits, and a quotient among fp16's subnormals is rounded once.
        # (torch's fp16_compress_hook casts first, then divides in fp16: bitwise the same
        # result unless a gradient overflows or its quotient is subnormal.)
        buf.div_(group.size)
        half = buf.to(state.dtype)  # (numel,) half
    state.stats.buckets += 1
    state.stats.bytes_sent += bus_bytes(half.numel() * half.element_size(), group.size)
    state.stats.bytes_dense += bus_bytes(buf.numel() * buf.element_size(), group.size)
    work = comm.all_reduce_async(half, op="sum", group=group, algorithm=state.algorithm)

    def decompress(done: comm.Work) -> torch.Tensor:
        with Timer(state.stats):
            # Back into the bucket itself: no second full-precision buffer (pytorch#45968).
            buf.copy_(done.value())
        return buf

    return work.then(decompress)


def cast_wrapper(name: str, hook: Callable) -> Callable:
    """A hook that runs ``hook`` on the bucket cast to ``name``'s dtype and casts its result
    back: e.g. ``cast_wrapper("bf16", topk_hook)`` sends bf16 top-k values.

    The inner hook sees a :class:`GradBucket` whose ``buffer()`` is the half tensor (and whose
    ``gradients()`` are views of it); it owns the averaging, as every hook does. Its handle
    may be a :class:`gradsync.comm.Work` or a ``torch.futures.Future``. When ``state`` has
    ``stats`` (every state of this package), the casts count into ``compress_s``.

    Raises:
        ValueError: unknown ``name``.
    """
    dtype = half_dtype(name)

    def cast_wrapper_hook(state, bucket: GradBucket) -> comm.Work:
        buf = bucket.buffer()  # (numel,) full precision
        stats = getattr(state, "stats", None)
        with _maybe_timer(stats):
            half = buf.to(dtype)  # (numel,) a new tensor the inner hook may change in place
        inner = GradBucket(bucket.index(), half, bucket.parameters(), bucket.offsets(),
                           bucket.is_last(), bucket.group)
        handle = hook(state, inner)

        def finish() -> torch.Tensor:
            result = result_tensor(handle.wait())  # (numel,) half, the average
            with _maybe_timer(stats):
                buf.copy_(result.view(-1))
            return buf

        return comm.Work(finish)

    cast_wrapper_hook.__name__ = f"{name}_{getattr(hook, '__name__', 'hook')}"
    return cast_wrapper_hook


def _maybe_timer(stats):
    return Timer(stats) if stats is not None else contextlib.nullcontext()


def naive_cast_average(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    """The oracle: what :func:`cast_hook` leaves on every rank, given each rank's tensor.

    Args:
        tensors: rank r's gradients at ``tensors[r]``, all of one shape and dtype.
        name: ``fp16`` or ``bf16``.
    Returns:
        The average in the tensors' dtype, summed in the half dtype in rank order (the same as
        any all-reduce's order for two ranks; a tolerance for more).
    """
    dtype, n = half_dtype(name), len(tensors)
    total = torch.zeros_like(tensors[0], dtype=dtype)
    for t in tensors:
        total += (t / n).to(dtype)
    return total.to(tensors[0].dtype)
