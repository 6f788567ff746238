"""Reduce to rank 0, then broadcast: the single-server pattern, and the naive baseline.

Rank 0 receives n-1 whole tensors and sends n-1 whole tensors, so its link carries
2(n-1)S bytes while the others carry 2S: it is the bottleneck the ring removes.
"""

from __future__ import annotations

import torch

from ..ops import ReduceOp, combine_
from ..p2p import P2P


def reduce_broadcast_all_reduce(buf: torch.Tensor, op: ReduceOp, p2p: P2P) -> None:
    """All-reduce ``buf`` (1-D, contiguous) in place through rank 0."""
    if p2p.size == 1 or buf.numel() == 0:
        return
    if p2p.rank == 0:
        incoming = torch.empty_like(buf)
        # Fixed order 1, 2, ..., n-1: the result does not depend on who arrives first.
        for peer in range(1, p2p.size):
            p2p.recv(incoming, peer)
            combine_(buf, incoming, op)
        works = [p2p.isend(buf, peer) for peer in range(1, p2p.size)]
        for peer, work in zip(range(1, p2p.size), works):
            p2p.wait(work, peer)
    else:
        p2p.send(buf, 0)
        p2p.recv(buf, 0)


def reduce_broadcast_shape(n: float, p: int) -> tuple[float, float, float]:
    """(messages, wire bytes, reduced bytes): rank 0 receives and sends p - 1 whole tensors."""
    return 2 * (p - 1), 2 * (p - 1) * n, (p - 1) * n
