"""Cut a process group's connections from this side, so that a collective blocked on a peer
that will never answer fails now instead of at the timeout.

A peer that dies closes its sockets and its partners' collectives fail at once ("Connection
closed by peer"). A peer whose host drops off the network (its link down, a power cut)
closes nothing: TCP keeps retransmitting for minutes, and gloo waits for the collective's
timeout. ``ProcessGroupGloo.abort()`` does not wake a pending wait (torch 2.13, measured),
so once the coordinator has declared such a peer lost, each survivor shuts down the TCP
connections of its own abandoned group itself (``shutdown(2)``: gloo's reader sees the end
of the stream and fails the pending collective exactly as if the peer had died).

Which sockets: every connected TCP socket of this process except those that existed before
the first group formed (the store's client among them, :func:`sockets`). Call it only while
no newer group is being joined: comm/elastic.py holds a lock around forming.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sockets() -> set[int]:
    """The file descriptors of this process that are sockets (``/proc/self/fd``)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
        except OSError:  # closed meanwhile (the listing's own descriptor among them)
            continue
    return found


def sever(keep: set[int]) -> int:
    """Shut down every connected TCP socket of this process whose descriptor is not in
    ``keep``; returns how many. The descriptors stay open: their owner closes them."""
    count = 0
    for fd in sorted(sockets() - keep):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                   socket.AF_INET6):
                sock.getpeername()  # raises on a listening or unconnected socket
                sock.shutdown(socket.SHUT_RDWR)
                count += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor is gloo's: do not close it here
    log.debug("severed %d connections", count)
    return count
