"""Spreading the parameters over K servers, balanced by bytes.

The parameters (one dtype) are laid end to end as one flat vector of P elements, in
``model.parameters()`` order, and cut into K contiguous ranges whose sizes differ by at most
one element. A large tensor is thereby split across servers, many tiny tensors share one,
and K larger than the number of tensors still balances (shards may be empty when K > P).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.p2p import chunk_bounds


@dataclass(frozen=True)
class ShardLayout:
    """Where each parameter lives in the flat vector and which range each server owns.

    Attributes:
        offsets: start of parameter i in the flat vector.
        numels: element count of parameter i.
        bounds: [start, end) of server k's shard.
    """

    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]

    @property
    def total(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def shard_numel(self, k: int) -> int:
        a, b = self.bounds[k]
        return b - a

    def pieces(self, k: int) -> list[tuple[int, int, int]]:
        """The parts of shard k: (param index, start inside the param, end inside the param),
        in flat order."""
        a, b = self.bounds[k]
        out = []
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            lo, hi = max(a, off), min(b, off + n)
            if lo < hi:
                out.append((i, lo - off, hi - off))
        return out

    def shards_of(self, i: int) -> list[int]:
        """Servers holding a piece of parameter i."""
        off, n = self.offsets[i], self.numels[i]
        return [k for k, (a, b) in enumerate(self.bounds) if max(a, off) < min(b, off + n)]


def shard_layout(params: list[torch.Tensor], servers: int) -> ShardLayout:
    """Lay ``params`` out over ``servers`` shards.

    Raises:
        ValueError: no servers, or parameters of more than one dtype.
    """
    if servers < 1:
        raise ValueError(f"need at least one server, got {servers}")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"the parameter server needs parameters of one dtype, got {dtypes}")
    offsets, numels, total = [], [], 0
    for p in params:
        offsets.append(total)
        numels.append(p.numel())
        total += p.numel()
    return ShardLayout(tuple(offsets), tuple(numels), tuple(chunk_bounds(total, servers)))


def gather_shard(tensors: list[torch.Tensor | None], layout: ShardLayout, k: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Copy shard k of the flat view of ``tensors`` into ``out`` (shape (shard numel,)).

    A None entry (a parameter without a gradient) contributes zeros, without allocating.
    """
    pos = 0
    for i, lo, hi in layout.pieces(k):
        if tensors[i] is None:
            out[pos:pos + hi - lo].zero_()
        else:
            out[pos:pos + hi - lo].copy_(tensors[i].reshape(-1)[lo:hi])
        pos += hi - lo
    return out


def scatter_shard(shard: torch.Tensor, layout: ShardLayout, k: int,
                  tensors: list[torch.Tensor]) -> None:
    """Write shard k back into the tensors it was cut from."""
    pos = 0
    with torch.no_grad():
        for i, lo, hi in layout.pieces(k):
            tensors[i].view(-1)[lo:hi].copy_(shard[pos:pos + hi - lo])
            pos += hi - lo
