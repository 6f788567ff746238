"""Spreading the parameters over K servers, balanced by bytes, each shard cut into partitions.

The parameters are laid end to end, in ``model.parameters()`` order, as one flat vector per
dtype (float32 tensors in one, float64 in another, ...; a single-dtype model has one). Each
server's share of the bytes is equal (differing by at most one element per dtype), or in
proportion to ``weights`` (each server's link rate, so that a server on a slow link holds
less). A large tensor is thereby split across servers, many tiny tensors share one, and K
larger than the number of tensors still balances (shards may be empty when K > P).

A share is cut into partitions of at most ``partition_bytes``, each of one dtype: the unit of
a push, a sum and a pull (BytePS's pipelining, OSDI 2020). A worker pushes a partition as soon
as backward has produced its gradients and pulls it as soon as the server has summed it, so
with C partitions a push+pull costs about (1 + 1/C) transfers of the shard, not 2. Where the
partitions lie is the layout (``LAYOUTS``):

- ``contiguous``: server k holds the k-th range of the vectors laid one after the other (the
  naive layout, and gradsync's before the striped one);
- ``striped`` (the default): the partitions are dealt out to the servers in turn along each
  vector, as BytePS assigns its partitions, so that every server hears from backward at
  once.

Measured (docs/benchmarks.md section 13): synthetic-mlp at 200 Mbit/s with 3 servers, whose
first layer is 43 % of the bytes, the contiguous layout's server 0 got its first push a
backward later than the others and ended the step that much later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..comm.p2p import chunk_bounds

DEFAULT_PARTITION_BYTES = 1 << 20   # when the link is not known
PARTITION_TARGET_S = 0.005          # else: a partition crosses the slowest link in ~5 ms
PARTITION_MIN_BYTES, PARTITION_MAX_BYTES = 64 << 10, 4 << 20
# The pushes heading into one link at once fit ~15 ms of it (at least 192 KiB), so that the
# queue in front of it takes them whole (the lab's: 20 ms of the link, at least 256 KiB);
# for that a partition may go below PARTITION_MIN_BYTES, down to INCAST_MIN_BYTES.
FAN_IN_S, FAN_IN_MIN_BYTES, INCAST_MIN_BYTES = 0.015, 192 << 10, 16 << 10


def partition_bytes_for(rate: float | None, fan_in: int = 1) -> int:
    """The default partition size for links of ``rate`` bytes/s (None: unknown) where up to
    ``fan_in`` pushes head into one link at once (``placement.fan_in``): about 5 ms on the
    link, within 64 KiB .. 4 MiB, and smaller (down to 16 KiB) where ``fan_in`` of those
    would not fit 15 ms of the link.

    The pipeline fills and drains with one partition, which crosses a worker's link shared
    by k servers in k times that: smaller partitions waste less (measured at 200 Mbit/s,
    3 + 3 hosts, synthetic-mlp: 500 KB partitions 1.84x the PS bound, 128 KiB 1.29x); each
    costs a few hundred microseconds of Python on both sides, so not too small. A server
    has one push of every worker on its link at once (it posts one payload's receive per
    worker, and gloo sends nothing before), and a host's link those of all its servers:
    past what the queue in front of it holds, TCP loses packets to the incast and waits
    (3 hosts x 2 ranks at 200 Mbit/s, digits-wide, one server and 4 workers elsewhere:
    125 KB partitions 1,149 ms a step and about 1,000 segments resent per host, 94 KB 831
    ms and 11-25; docs/benchmarks.md section 13)."""
    if not rate:
        return DEFAULT_PARTITION_BYTES
    size = min(max(rate * PARTITION_TARGET_S, PARTITION_MIN_BYTES), PARTITION_MAX_BYTES)
    budget = max(rate * FAN_IN_S, FAN_IN_MIN_BYTES) / max(fan_in, 1)
    return int(max(min(size, budget), INCAST_MIN_BYTES))


@dataclass(frozen=True)
class Part:
    """One partition: elements [start, end) of the flat vector of ``dtype``, on server
    ``shard``, partition ``index`` there."""

    shard: int
    index: int
    dtype: torch.dtype
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ShardLayout:
    """Where each parameter lives and which partitions each server owns.

    Attributes:
        dtypes: dtype of parameter i.
        offsets: start of parameter i in the flat vector of its dtype.
        numels: element count of parameter i.
        shards: per server, its partitions in flat order.
    """

    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    shards: tuple[tuple[Part, ...], ...]

    def shard_numel(self, k: int) -> int:
        return sum(p.numel for p in self.shards[k])

    def parts(self, k: int) -> tuple[Part, ...]:
        return self.shards[k]

    def pieces(self, part: Part) -> list[tuple[int, int, int]]:
        """The parts of ``part``: (param index, start inside the param, end inside the param),
        in flat order."""
        out = []
        for i, (dtype, off, n) in enumerate(zip(self.dtypes, self.offsets, self.numels)):
            lo, hi = max(part.start, off), min(part.end, off + n)
            if dtype == part.dtype and lo < hi:
                out.append((i, lo - off, hi - off))
        return out

    def parts_of(self, i: int) -> list[Part]:
        """Partitions holding a piece of parameter i, the last in flat order first (backward's
        own order, last layers first): the order a worker pushes them in once the gradient
        is in, every server's in turn."""
        off, n, dtype = self.offsets[i], self.numels[i], self.dtypes[i]
        return sorted((p for parts in self.shards for p in parts
                       if p.dtype == dtype and max(p.start, off) < min(p.end, off + n)),
                      key=lambda p: -p.start)


def _cuts(sizes: list[int], itemsizes: list[int], servers: int,
          weights: list[float] | None) -> list[int]:
    """Cut points, in elements of the concatenated vectors, of ``servers`` byte ranges."""
    total = sum(sizes)
    if weights is None and len(sizes) <= 1:
        return [b for _, b in chunk_bounds(total, servers)]  # differ by one element at most
    w = [1.0] * servers if weights is None else [max(float(x), 0.0) for x in weights]
    if sum(w) <= 0:
        raise ValueError(f"server weights {weights} are all zero")
    nbytes = sum(n * s for n, s in zip(sizes, itemsizes))
    cuts, acc = [], 0.0
    for k in range(servers):
        acc += w[k]
        target = nbytes * acc / sum(w)  # bytes before the cut
        elems, before = 0, 0.0
        for n, s in zip(sizes, itemsizes):  # walk the vectors to the byte target
            if before + n * s >= target:
                elems += round((target - before) / s)
                break
            elems, before = elems + n, before + n * s
        cuts.append(elems if k < servers - 1 else total)
    return cuts


def _contiguous(order: list[torch.dtype], sizes: dict[torch.dtype, int], servers: int,
                weights: list[float] | None, partition_bytes: int | None) -> list[list[Part]]:
    """Server k holds the k-th of ``servers`` byte ranges of the concatenated vectors, cut into
    partitions in flat order."""
    cuts = _cuts([sizes[d] for d in order], [d.itemsize for d in order], servers, weights)
    shards, lo = [], 0
    for k, hi in enumerate(cuts):
        parts: list[Part] = []
        base = 0
        for dtype in order:  # the range [lo, hi) of the concatenation, per dtype
            a, b = max(lo, base) - base, min(hi, base + sizes[dtype]) - base
            base += sizes[dtype]
            if a >= b:
                continue
            for x, y in chunk_bounds(b - a, _count(b - a, dtype, partition_bytes)):
                parts.append(Part(k, len(parts), dtype, a + x, a + y))
        shards.append(parts)
        lo = hi
    return shards


def _striped(order: list[torch.dtype], sizes: dict[torch.dtype, int], servers: int,
             weights: list[float] | None, partition_bytes: int | None) -> list[list[Part]]:
    """Each dtype's vector is cut into partitions dealt out to the servers in turn (BytePS's
    round robin): server k holds its share (``weights``) of each vector, in partitions spread
    evenly along it, so every layer's gradients reach every server. Backward produces the last layers first; laid out contiguously, the server holding
    the first layers hears nothing until backward reaches them, and its stream of partitions,
    which alone fills its link, ends that much later (18 ms of a 360 ms step measured)."""
    shards: list[list[Part]] = [[] for _ in range(servers)]
    for dtype in order:
        cuts = _cuts([sizes[dtype]], [dtype.itemsize], servers, weights)
        slots = []  # (where along the vector, server, elements): server k's j-th of c at (j+.5)/c
        for k, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts)):
            count = _count(hi - lo, dtype, partition_bytes)
            slots += [((j + 0.5) / count, k, y - x)
                      for j, (x, y) in enumerate(chunk_bounds(hi - lo, count))]
        start = 0
        for _, k, numel in sorted(slots):
            shards[k].append(Part(k, len(shards[k]), dtype, start, start + numel))
            start += numel
    return shards


def _count(numel: int, dtype: torch.dtype, partition_bytes: int | None) -> int:
    """Partitions of a server's ``numel`` elements of ``dtype`` (0 when it has none)."""
    if numel <= 0:
        return 0
    return 1 if partition_bytes is None else math.ceil(numel * dtype.itemsize / partition_bytes)


LAYOUTS = {"striped": _striped, "contiguous": _contiguous}


def shard_layout(params: list[torch.Tensor], servers: int, *,
                 weights: list[float] | None = None,
                 partition_bytes: int | None = None, layout: str = "striped") -> ShardLayout:
    """Lay ``params`` out over ``servers`` shards cut into partitions.

    Args:
        params: the trained parameters, in model order (any mix of dtypes).
        servers: K.
        weights: per server, its share of the bytes (e.g. its link rate); None: equal.
        partition_bytes: the largest partition; None: one partition per shard and dtype.
        layout: "striped" (partitions dealt out in turn) or "contiguous" (server k holds
            the k-th range), a key of ``LAYOUTS``.

    Raises:
        ValueError: no servers, a weight list of another length, a partition size below 1,
            an unknown layout.
    """
    if servers < 1:
        raise ValueError(f"need at least one server, got {servers}")
    if weights is not None and len(weights) != servers:
        raise ValueError(f"{len(weights)} server weights for {servers} servers")
    if partition_bytes is not None and partition_bytes < 1:
        raise ValueError(f"partition size must be at least 1 byte, got {partition_bytes}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    order: list[torch.dtype] = []  # dtypes in order of first appearance
    sizes: dict[torch.dtype, int] = {}
    offsets, numels = [], []
    for p in params:
        if p.dtype not in sizes:
            order.append(p.dtype)
            sizes[p.dtype] = 0
        offsets.append(sizes[p.dtype])
        numels.append(p.numel())
        sizes[p.dtype] += p.numel()
    shards = LAYOUTS[layout](order, sizes, servers, weights, partition_bytes)
    for k, parts in enumerate(shards):
        if not parts:  # an empty shard still has one (empty) partition: pushed every step
            parts.append(Part(k, 0, order[0] if order else torch.float32, 0, 0))
    return ShardLayout(tuple(p.dtype for p in params), tuple(offsets), tuple(numels),
                       tuple(tuple(parts) for parts in shards))


def gather_part(tensors: list[torch.Tensor | None], layout: ShardLayout, part: Part,
                out: torch.Tensor) -> torch.Tensor:
    """Copy partition ``part`` of the flat view of ``tensors`` into ``out`` ((numel,)).

    A None entry (a parameter without a gradient) contributes zeros, without allocating.
    """
    pos = 0
    for i, lo, hi in layout.pieces(part):
        if tensors[i] is None:
            out[pos:pos + hi - lo].zero_()
        else:
            out[pos:pos + hi - lo].copy_(tensors[i].reshape(-1)[lo:hi])
        pos += hi - lo
    return out


def scatter_part(values: torch.Tensor, layout: ShardLayout, part: Part,
                 tensors: list[torch.Tensor]) -> None:
    """Write partition ``part`` ((numel,)) back into the tensors it was cut from."""
    pos = 0
    with torch.no_grad():
        for i, lo, hi in layout.pieces(part):
            tensors[i].view(-1)[lo:hi].copy_(values[pos:pos + hi - lo])
            pos += hi - lo
