"""Errors raised by the communication layer.

Engines report a lost peer or an expired timeout as a bare ``RuntimeError`` whose text names
an address, not a rank. gradsync translates them at the point where it knows which rank it
was talking to and which operation was running, so the user reads "rank 2 was lost during
all_reduce(ring)" instead of "Connection closed by peer [127.0.0.1]:40213".
"""

from __future__ import annotations

import re


class CommError(RuntimeError):
    """Base class for failures of a collective or point-to-point operation."""


class PeerLostError(CommError):
    """A peer's connection dropped (the process exited, was killed, or its link went down)."""


class CommTimeoutError(CommError):
    """A blocking operation waited longer than the group's timeout."""


class CollectiveMismatchError(CommError):
    """Ranks called different collectives, or the same one with different shapes or dtypes."""


_LOST_MARKERS = ("connection closed", "connection reset", "broken pipe", "connection refused",
                 "socket closed", "read error", "write error", "eof")
_TIMEOUT_MARKERS = ("timed out", "timeout")


def _engine_text(exc: BaseException) -> str:
    """The engine's message without its source location and boilerplate advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0]


def translate(exc: BaseException, *, what: str, rank: int, peer: int | None = None) -> CommError:
    """Turn an engine exception into a :class:`CommError` that names ranks.

    Args:
        exc: the exception raised by torch.distributed.
        what: the operation that was running, e.g. ``"all_reduce(ring)"``.
        rank: this process's rank in the group.
        peer: the rank this process was exchanging with, when the operation is point-to-point.
    """
    if isinstance(exc, CommError):
        return exc
    text = _engine_text(exc)
    low = str(exc).lower()
    who = f"rank {peer}" if peer is not None else "a peer"
    if any(m in low for m in _TIMEOUT_MARKERS):
        return CommTimeoutError(f"rank {rank}: {what} timed out waiting for {who} ({text})")
    if any(m in low for m in _LOST_MARKERS):
        return PeerLostError(f"rank {rank}: lost {who} during {what} ({text})")
    return CommError(f"rank {rank}: {what} failed with {who} ({text})")
