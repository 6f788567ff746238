"""Where sharded parameters live: flat buckets split into one piece per rank.

Parameters are grouped into buckets (one dtype each, in reverse registration order, the
grouping of :func:`gradsync.allreduce.buckets.assign_buckets`) and each bucket's parameters
are moved into one flat buffer, padded so that it splits into ``N`` equal pieces:

    flat  (N * k,)   k = ceil(numel / N); piece r = flat[r*k:(r+1)*k] belongs to rank r

Every rank owns piece r of *every* bucket, so each rank holds the same number of bytes of
each dtype (at most N - 1 padding elements per bucket, all on the last ranks), and each
bucket's gradient is one reduce-scatter the moment backward completes it. One contiguous
shard of a whole dtype's buffer would instead need a reduce per (bucket, owner) pair, or
one reduce-scatter after backward; with a single bucket per dtype (a large
``bucket_cap_mb``) the two layouts are the same.

Stage 3 passes ``units`` (one list of parameters per layer, stage3.py) so that no bucket spans
two layers, and calls :func:`own_pieces`: each piece then lives in its own (k,) ``shard``,
because ``flat``'s storage is freed at rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..allreduce.buckets import assign_buckets


@dataclass
class ShardedBucket:
    """One flat bucket of parameters and this rank's piece of it.

    Attributes:
        index: position in launch order (the same on every rank).
        params: the parameters whose data are views into ``flat``.
        offsets: start of each parameter in ``flat``.
        numel: real elements in ``flat`` (the rest is zero padding).
        flat: (N * k,) the parameters' storage.
        piece: this rank's real elements of ``flat``, (<= k,), a leaf sharing its storage;
            what the shard optimizer steps (None when this rank's piece is all padding).
        grad_flat: (N * k,) gradients of ``params`` divided by N; stage 1 keeps it, stage 2
            holds it only while the bucket is filled.
        unit: the layer (stage 3) whose parameters these are; 0 when there are no units.
        shapes: the parameters' shapes (stage 3's are (0,) placeholders at rest).
        shard: stage 3: (k,) this rank's piece with its padding, in storage of its own (the
            all-gather's input); ``piece`` is a view of its real elements. None in stages 1-2.
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    flat: torch.Tensor
    size: int  # N
    rank: int
    piece: nn.Parameter | None = None
    grad_flat: torch.Tensor | None = None
    ready: set[int] = field(default_factory=set)
    unit: int = 0
    shard: torch.Tensor | None = None
    shapes: list[torch.Size] = field(default_factory=list)

    @property
    def k(self) -> int:
        """Elements per piece, padding included."""
        return self.flat.numel() // self.size

    def real(self, r: int) -> int:
        """Real (unpadded) elements of rank r's piece."""
        return max(0, min(self.k, self.numel - r * self.k))

    def pieces(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """``buf`` (N * k,) as N views of (k,), one per rank."""
        return list(buf.view(self.size, self.k).unbind(0))

    def grad_view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.grad_flat[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    def is_full(self) -> bool:
        return len(self.ready) == len(self.params)


def shard_parameters(params: list[nn.Parameter], cap_bytes: int, size: int, rank: int,
                     units: list[list[int]] | None = None) -> list[ShardedBucket]:
    """Move ``params`` into padded flat buckets (``param.data`` becomes a view) and make
    each bucket's piece for ``rank`` of ``size`` ranks.

    Args:
        params: trainable parameters in registration order; their values are kept.
        cap_bytes: a bucket closes once it holds at least this many bytes.
        units: indices into ``params``, one list per unit in registration order; a bucket
            holds parameters of one unit only (later units' buckets first: backward order).
    Returns:
        The buckets in launch order.
    """
    groups = [list(range(len(params)))] if units is None else units
    plan = [(u, [groups[u][i] for i in members]) for u in reversed(range(len(groups)))
            for members in assign_buckets([params[i] for i in groups[u]], cap_bytes)]
    buckets = []
    for index, (unit, members) in enumerate(plan):
        chosen = [params[i] for i in members]
        offsets, numel = [], 0
        for p in chosen:
            offsets.append(numel)
            numel += p.numel()
        k = -(-numel // size)
        flat = torch.zeros(size * k, dtype=chosen[0].dtype, device=chosen[0].device)
        with torch.no_grad():
            for p, offset in zip(chosen, offsets):
                view = flat[offset:offset + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view  # the old storage is freed: parameters now live in ``flat``
        bucket = ShardedBucket(index, chosen, offsets, numel, flat, size, rank, unit=unit,
                               shapes=[p.shape for p in chosen])
        real = bucket.real(rank)
        if real:
            bucket.piece = nn.Parameter(flat[rank * k:rank * k + real])
        buckets.append(bucket)
    return buckets


def own_pieces(buckets: list[ShardedBucket]) -> None:
    """Stage 3: copy each bucket's piece (with its padding) into a (k,) ``shard`` of its own
    and make ``piece`` a view of it, so that ``flat``'s storage can be freed."""
    for b in buckets:
        b.shard = b.pieces(b.flat)[b.rank].clone()
        if b.piece is not None:
            b.piece = nn.Parameter(b.shard[:b.piece.numel()])
