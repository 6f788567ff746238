"""Rabenseifner's all-reduce: reduce-scatter by recursive halving, all-gather by recursive
doubling (Thakur, Rabenseifner & Gropp 2005).

2 lg p messages instead of the ring's 2(p-1), with the same 2(p-1)/p * S bytes: between the
tree (few messages) and the ring (pipelined bandwidth).

World sizes that are not powers of two fold in first: with p' the largest power of two
<= p and x = p - p', among the first 2x ranks each even rank hands its tensor to the odd
rank above it and sits out; the p' remaining ranks run the power-of-two algorithm and the
odd ranks hand the result back at the end.
"""

from __future__ import annotations

import math

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P, chunk_bounds


def halving_doubling_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place."""
    n, r = p2p.size, p2p.rank
    if n == 1 or buf.numel() == 0:
        return
    pow2 = 1 << (n.bit_length() - 1)
    extra = n - pow2
    scratch = torch.empty_like(buf)

    # Fold the extra ranks in.
    if r < 2 * extra:
        if r % 2 == 0:
            p2p.send(buf, r + 1)
            p2p.recv(buf, r + 1)
            return
        p2p.recv(scratch, r - 1)
        combine_(buf, scratch, op)
        vrank = r // 2
    else:
        vrank = r - extra

    def real(v: int) -> int:
        return 2 * v + 1 if v < extra else v + extra

    blocks = chunk_bounds(buf.numel(), pow2)

    def span(lo: int, hi: int) -> tuple[int, int]:
        """Element range of blocks [lo, hi)."""
        return blocks[lo][0], blocks[hi - 1][1]

    # Reduce-scatter by halving: keep the half of the window that matches our bit, send the
    # other half to the partner. Afterwards rank v owns block v.
    lo, hi, mask = 0, pow2, pow2 >> 1
    while mask >= 1:
        partner = real(vrank ^ mask)
        mid = (lo + hi) // 2
        (keep_lo, keep_hi), (give_lo, give_hi) = ((mid, hi), (lo, mid)) if vrank & mask \
            else ((lo, mid), (mid, hi))
        ka, kb = span(keep_lo, keep_hi)
        ga, gb = span(give_lo, give_hi)
        p2p.sendrecv(buf[ga:gb], partner, scratch[ka:kb], partner)
        combine_(buf[ka:kb], scratch[ka:kb], op)
        lo, hi = keep_lo, keep_hi
        mask >>= 1

    # All-gather by doubling: swap finished windows with partners at growing distance.
    mask = 1
    while mask < pow2:
        partner = real(vrank ^ mask)
        other_lo, other_hi = (lo - mask, lo) if vrank & mask else (hi, hi + mask)
        a, b = span(lo, hi)
        oa, ob = span(other_lo, other_hi)
        p2p.sendrecv(buf[a:b], partner, buf[oa:ob], partner)
        lo, hi = min(lo, other_lo), max(hi, other_hi)
        mask <<= 1

    # Hand the result back to the rank that sat out.
    if r < 2 * extra:
        p2p.send(buf, r - 1)


def halving_doubling_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages, wire bytes, reduced bytes) on the largest power of two q <= p, plus one
    fold in and out for the p - q extra ranks."""
    q = 1 << (p.bit_length() - 1)
    fold = (2, 2 * n, n) if q != p else (0, 0, 0)
    return (2 * math.log2(q) + fold[0], 2 * (q - 1) / q * n + fold[1],
            (q - 1) / q * n + fold[2])
