"""Addresses and listening sockets, shared by the launcher and the communication layer.

No torch import: the launcher must start fast. One definition of "loopback" for both sides,
so the launcher and the rendezvous agree on when gloo may be kept on the ``lo`` interface.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["bind_listener", "is_loopback"]


def is_loopback(addr: str) -> bool:
    """Whether every address ``addr`` resolves to is a loopback address (127.0.0.0/8, ::1).

    A name that does not resolve counts as not loopback: the engine will report it.
    """
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                               for info in infos)


def bind_listener(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to ``addr:port`` (IPv4 or IPv6), with SO_REUSEADDR as the
    rendezvous store sets it: a port left in TIME_WAIT by the previous run is usable, only a
    live listener makes the bind fail.

    Raises:
        OSError: the address is not one of this machine's, or the port is taken.
    """
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_fd(addr: str, port: int) -> tuple[int, int]:
    """A listening socket on ``addr:port`` (0: a free port) handed over as a bare descriptor,
    for a TCPStore to adopt (it closes the descriptor with itself); returns (fd, port).

    Raises:
        RuntimeError: the address cannot be bound (the port is in use, most often).
    """
    try:
        sock = bind_listener(addr, port)
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {addr}:{port} ({exc.strerror}); "
                           "is the port already in use?") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock.detach(), port
