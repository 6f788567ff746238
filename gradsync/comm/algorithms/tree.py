"""Binomial-tree reduce to rank 0, then binomial-tree broadcast.

2 ceil(lg p) messages on the critical path (alpha term) and whole-tensor messages (n lg p beta
over the two phases): the choice for small tensors, where latency dominates.
"""

from __future__ import annotations

import math

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P


def tree_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place with a binomial tree rooted at rank 0."""
    n, r = p2p.size, p2p.rank
    if n == 1 or buf.numel() == 0:
        return
    incoming = None
    # Reduce: at distance `mask`, ranks with that bit set hand their partial sum down and
    # leave; the others absorb the partial sum of rank + mask.
    mask = 1
    while mask < n:
        if r & mask:
            p2p.send(buf, r - mask)
            break
        if r + mask < n:
            if incoming is None:
                incoming = torch.empty_like(buf)
            p2p.recv(incoming, r + mask)
            combine_(buf, incoming, op)
        mask <<= 1
    # Broadcast: the same tree in reverse. A rank first receives from the parent it sent to
    # (lowest set bit), then forwards to its children at smaller distances.
    if r != 0:
        low = r & -r
        p2p.recv(buf, r - low)
        mask = low >> 1
    else:
        mask = 1
        while mask < n:
            mask <<= 1
        mask >>= 1
    while mask >= 1:
        if r + mask < n:
            p2p.send(buf, r + mask)
        mask >>= 1


def tree_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages, wire bytes, reduced bytes): ceil(log2 p) rounds down and up, whole tensor."""
    lg = math.ceil(math.log2(p))
    return 2 * lg, 2 * lg * n, lg * n
