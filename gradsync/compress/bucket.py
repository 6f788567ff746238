"""What a communication hook receives and returns, as in DDP's comm-hook contract.

``hook(state, bucket)`` gets a :class:`GradBucket`: the bucket's flat buffer holding this
rank's *own* gradients (summed over ``no_sync()`` accumulation, not yet averaged), its index
and parameters. It returns a handle whose ``wait()`` gives the averaged flat tensor: a
:class:`gradsync.comm.Work`, or a ``torch.futures.Future`` as DDP's hooks return (its value
may be the tensor or a one-element list of it). DataParallel copies that result into the
bucket when it is another tensor. The hook owns the averaging: dividing by the world size is
its job, as in DDP, so hooks written for DDP that use only ``torch`` calls and ``bucket``'s
methods run unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import comm


@dataclass
class HookStats:
    """What a hook moved and what it cost, since the state was made.

    ``bytes_sent`` counts the payload this rank put on the wire for the gradients (for an
    all-reduce, the bus bytes 2(n-1)/n of the buffer it reduced), ``bytes_dense`` what the
    uncompressed all-reduce of the same buckets would have sent; ``compress_s`` the time spent
    compressing and decompressing, outside the collectives.
    """

    buckets: int = 0
    bytes_sent: float = 0.0
    bytes_dense: float = 0.0
    compress_s: float = 0.0

    @property
    def ratio(self) -> float:
        """How many times fewer bytes than uncompressed (1.0 when nothing was sent)."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    def snapshot(self) -> dict[str, float]:
        return {"buckets": self.buckets, "bytes_sent": self.bytes_sent,
                "bytes_dense": self.bytes_dense, "compress_s": self.compress_s}


class GradBucket:
    """One gradient bucket as a hook sees it (DDP's ``GradBucket`` methods)."""

    def __init__(self, index: int, buffer: torch.Tensor, parameters: list[torch.nn.Parameter],
                 offsets: list[int], is_last: bool, group: comm.Group):
        self._index, self._buffer, self._params = index, buffer, parameters
        self._offsets, self._is_last = offsets, is_last
        self.group = group
        """The ranks this bucket is averaged over."""

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        """(numel,) flat gradients of this rank."""
        return self._buffer

    def set_buffer(self, tensor: torch.Tensor) -> None:
        """Make ``tensor`` what ``buffer()`` returns, as DDP does (its compress wrappers hand
        the inner hook a half-precision buffer this way); DataParallel copies the hook's
        result back into the bucket."""
        self._buffer = tensor

    def is_last(self) -> bool:
        """The last bucket of the step (DDP's hooks advance their step counter on it)."""
        return self._is_last

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params)

    def gradients(self) -> list[torch.Tensor]:
        """Views of ``buffer()``, one per parameter, shaped like it."""
        return [self._buffer[o:o + p.numel()].view_as(p)
                for o, p in zip(self._offsets, self._params)]

    def offsets(self) -> list[int]:
        return list(self._offsets)


def bus_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank sends in an all-reduce of ``nbytes`` (nccl-tests' bus bytes)."""
    return float(comm.bus_factor(world) * nbytes) if world > 1 else 0.0


class Timer:
    """``with Timer(stats):`` adds the block's duration to ``stats.compress_s``."""

    def __init__(self, stats: HookStats):
        self.stats = stats

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stats.compress_s += time.perf_counter() - self.start


def result_tensor(value) -> torch.Tensor:
    """The tensor a hook's handle finished with: DDP's futures may hold ``[tensor]``."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a comm hook's handle must finish with a tensor, not "
                        f"{type(value).__name__}")
    return value
