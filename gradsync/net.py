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


def route_to(host: str, port: int) -> tuple[str, str]:
    """(the local address, its interface name) this machine reaches ``host`` from: what a
    worker's gloo should bind (GLOO_SOCKET_IFNAME) to talk to the hosts of that network.
    A UDP ``connect`` picks the route without sending anything."""
    import fcntl
    import struct

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        local = probe.getsockname()[0]
    if family == socket.AF_INET:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    raw = fcntl.ioctl(s.fileno(), 0x8915,
                                      struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == local:
                    return local, name
    raise OSError(f"no interface holds {local}, the address that reaches {host}")


def parse_endpoint(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError naming ``flag``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{flag} must be HOST:PORT (a port 1-65535), got {text!r}")
    return host.strip("[]"), int(port)
