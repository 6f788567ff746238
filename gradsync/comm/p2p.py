"""Point-to-point transfers inside a group, the substrate of gradsync's own algorithms.

Peers are group ranks; the engine wants global ranks, so every call translates. Empty
tensors are never put on the wire: both ends derive sizes from the same arithmetic, so both
skip the same transfers. Every wait goes through :meth:`P2P.wait`, which turns the engine's
errors into ones that name the peer and the operation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..split import chunk_bounds  # noqa: F401 - algorithms/, ps/ and bench/ import it here
from .errors import translate
from .group import Group, resolve
from .work import Work


class _Done:
    """Stand-in for the handle of a transfer that carried nothing."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


_DONE = _Done()


class P2P:
    """Send and receive within ``group`` on behalf of the operation named ``what``.

    ``members`` (group ranks, default all of them) makes a view: ``rank``, ``size`` and every
    peer are then positions in ``members``, so an algorithm written for a whole group runs
    unchanged on a subset, e.g. the ranks of one host (hierarchical all-reduce). Errors name
    the peer's group rank.
    """

    def __init__(self, group: Group, what: str, members: Sequence[int] | None = None):
        self.group = group
        self.what = what
        self.members = tuple(range(group.size)) if members is None else tuple(members)
        self.rank = self.members.index(group.rank)
        self.size = len(self.members)

    def view(self, members: Sequence[int]) -> "P2P":
        """The same transfers among ``members`` (positions in this view), which must include
        this rank."""
        return P2P(self.group, self.what, [self.members[m] for m in members])

    def rates(self) -> list[float] | None:
        """Each member's share of its host's link in bytes/s, from the group's topology
        (None without one, or when it was not measured)."""
        topology = self.group.topology
        if topology is None or not topology.measured:
            return None
        per_rank = topology.rank_rates()
        return [per_rank[m] for m in self.members]

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        if tensor.numel() == 0:
            return _DONE
        self.group.stats.bytes_sent += tensor.numel() * tensor.element_size()
        peer = self.members[peer]
        try:
            return self.group.engine.isend(tensor, self.group.global_rank(peer), self.group.pg,
                                           tag)
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.group.rank, peer=peer) from exc

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        if tensor.numel() == 0:
            return _DONE
        peer = self.members[peer]
        try:
            return self.group.engine.irecv(tensor, self.group.global_rank(peer), self.group.pg,
                                           tag)
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.group.rank, peer=peer) from exc

    def wait(self, work, peer: int) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.group.rank,
                            peer=self.members[peer]) from exc

    def send(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        self.wait(self.isend(tensor, peer, tag), peer)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        self.wait(self.irecv(tensor, peer, tag), peer)

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int,
                 tag: int = 0) -> None:
        """Send to ``dst`` and receive from ``src`` at once, so that pairs exchanging with
        each other cannot deadlock on two blocking sends."""
        r = self.irecv(recv, src, tag)
        s = self.isend(send, dst, tag)
        self.wait(r, src)
        self.wait(s, dst)


def weighted_bounds(numel: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into contiguous pieces proportional to ``weights`` (>= 0, not
    all zero). Sizes are floors plus one for the largest remainders (ties to the lower index),
    so every rank computing this from the same weights gets the same bounds; a weight of 0
    gives an empty piece.
    """
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 and not all zero, got {list(weights)}")
    exact = [numel * w / total for w in weights]
    sizes = [int(x) for x in exact]
    order = sorted((i for i in range(len(weights)) if weights[i] > 0),
                   key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[:numel - sum(sizes)]:
        sizes[i] += 1
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


# --- public point-to-point API (the Parameter Server's transport) ------------------------------

def send(tensor: torch.Tensor, dst: int, group: Group | None = None, tag: int = 0,
         what: str = "send") -> None:
    """Blocking send of ``tensor`` to group rank ``dst``; errors name the peer and ``what``
    (e.g. "push of shard 1 at step 40")."""
    P2P(resolve(group), what).send(tensor, dst, tag)


def recv(tensor: torch.Tensor, src: int, group: Group | None = None, tag: int = 0,
         what: str = "recv") -> None:
    """Blocking receive into ``tensor`` from group rank ``src``; errors name the peer."""
    P2P(resolve(group), what).recv(tensor, src, tag)


def isend(tensor: torch.Tensor, dst: int, group: Group | None = None, tag: int = 0,
          what: str = "send") -> Work:
    """Start a send; the returned handle's ``wait()`` finishes it. The handle keeps
    ``tensor`` alive until then; do not change it before."""
    p2p = P2P(resolve(group), what)
    handle = p2p.isend(tensor, dst, tag)
    return Work(lambda: p2p.wait(handle, dst), poll=handle.is_completed, keep=tensor)


def irecv(tensor: torch.Tensor, src: int, group: Group | None = None, tag: int = 0,
          what: str = "recv") -> Work:
    """Start a receive into ``tensor``; ``wait()`` returns when it has arrived."""
    p2p = P2P(resolve(group), what)
    handle = p2p.irecv(tensor, src, tag)
    return Work(lambda: p2p.wait(handle, src), poll=handle.is_completed)
