"""Point-to-point transfers inside a group, the substrate of gradsync's own algorithms.

Peers are group ranks; the engine wants global ranks, so every call translates. Empty
tensors are never put on the wire: both ends derive sizes from the same arithmetic, so both
skip the same transfers. Every wait goes through :meth:`P2P.wait`, which turns the engine's
errors into ones that name the peer and the operation.
"""

from __future__ import annotations

import torch

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
    """Send and receive within ``group`` on behalf of the operation named ``what``."""

    def __init__(self, group: Group, what: str):
        self.group = group
        self.what = what
        self.rank = group.rank
        self.size = group.size

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        if tensor.numel() == 0:
            return _DONE
        self.group.stats.bytes_sent += tensor.numel() * tensor.element_size()
        try:
            return self.group.engine.isend(tensor, self.group.global_rank(peer), self.group.pg,
                                           tag)
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.rank, peer=peer) from exc

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        if tensor.numel() == 0:
            return _DONE
        try:
            return self.group.engine.irecv(tensor, self.group.global_rank(peer), self.group.pg,
                                           tag)
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.rank, peer=peer) from exc

    def wait(self, work, peer: int) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise translate(exc, what=self.what, rank=self.rank, peer=peer) from exc

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


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``parts`` contiguous pieces whose sizes differ by at most 1.

    The first ``numel % parts`` pieces get one extra element; pieces may be empty when
    ``numel < parts``.
    """
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
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
