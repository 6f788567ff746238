"""Thin wrappers over `ip` and `tc` (iproute2), each failing with a one-line :class:`LabError`.

Every command that creates something runs *inside* a namespace of the lab (``ip -n NS``):
veth pairs are created in the switch namespace with their peer sent straight into the host
namespace, so the machine's own namespace never sees an interface of the lab, and deleting
the lab's namespaces deletes everything else with them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

# tc's rate units (tc(8), "RATES"): bits per second with SI or IEC multipliers, or bytes
# per second ("bps" is bytes, as in tc). A bare number is bits per second.
_RATE_UNITS = {
    "": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_MIN_RATE = 8_000  # 8 kbit/s: below this a full-size frame takes longer than tbf's queue allows
_MAX_RATE = 100 * 10**9
_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole",
                "unreachable", "prohibit", "throw", "nat"}


class LabError(Exception):
    """A problem the user can fix (not root, a bad rate, a lab already up); one line."""


def check_rates(hosts: int | None, rates: str | None) -> None:
    """``--rates R1,R2,...`` must name one rate per host of ``--lab N`` (ValueError)."""
    if rates is not None and hosts is not None and len(rates.split(",")) != hosts:
        raise ValueError(f"--rates lists {len(rates.split(','))} rates for {hosts} hosts")


def parse_rate(text: str) -> int:
    """Parse a tc-style rate ("1gbit", "250mbit", "100kbit", "12.5mbps", "1000000").

    Returns:
        The rate in bits per second.

    Raises:
        LabError: the text is not a rate, or it is outside 8kbit..100gbit.
    """
    m = _RATE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _RATE_UNITS:
        raise LabError(f"cannot parse rate {text!r}; use a number with a tc unit such as "
                       "100kbit, 250mbit, 1gbit or 12mbps (bytes/s)")
    bits = round(float(m.group(1)) * _RATE_UNITS[unit])
    if not _MIN_RATE <= bits <= _MAX_RATE:
        raise LabError(f"rate {text!r} is outside the supported range 8kbit-100gbit")
    return bits


def format_rate(bits: int) -> str:
    """The shortest exact tc spelling of ``bits`` per second ("200mbit", "1gbit", "1500bit")."""
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits % mult == 0:
            return f"{bits // mult}{unit}"
    return f"{bits}bit"


def check_tools() -> None:
    """Raise a one-line LabError unless this process may build namespaces with ip and tc."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LabError(f"gradsync lab needs the {' and '.join(missing)} command"
                       f"{'s' if len(missing) > 1 else ''} (package iproute2) on PATH")
    if os.geteuid() != 0:
        raise LabError("gradsync lab needs root to create network namespaces, veth pairs "
                       "and tc qdiscs; run it as root (e.g. with sudo)")


def run(cmd: list[str], *, check: bool = True) -> str:
    """Run one iproute2 command; return its stdout.

    Raises:
        LabError: with the command and the first line of its error output, when it fails
            and ``check`` is true.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found; gradsync lab needs iproute2") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(cmd)}` did not finish within 30 s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")
        raise LabError(f"`{' '.join(cmd)}` failed: {err.splitlines()[0]}")
    return proc.stdout


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """``ip [-n ns] args...``."""
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def tc(*args: str, ns: str) -> str:
    """``tc -n ns args...``: the lab only ever shapes links inside its own namespaces."""
    return run(["tc", "-n", ns, *args])


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def add_netns(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def netns_pids(name: str) -> list[int]:
    """Processes running inside namespace ``name`` (empty if it does not exist)."""
    out = ip("netns", "pids", name, check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def del_netns(name: str) -> None:
    """Delete namespace ``name``; its interfaces go with it. Missing is not an error."""
    if name in list_netns():
        ip("netns", "del", name)


def add_veth(switch_ns: str, port: str, host_ns: str, host_if: str) -> None:
    """A veth pair: ``port`` in the switch namespace, ``host_if`` in the host namespace."""
    ip("link", "add", port, "type", "veth", "peer", "name", host_if, "netns", host_ns,
       ns=switch_ns)


def add_bridge(ns: str, name: str) -> None:
    # STP off (the default) and no forward delay: ports forward as soon as they are up.
    ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0", ns=ns)
    ip("link", "set", name, "up", ns=ns)


def tbf_params(rate_bits: int) -> tuple[int, int]:
    """Burst and queue limit, in bytes, for a token bucket at ``rate_bits``.

    The burst must hold a whole GSO super-packet (veth passes up to 64 KiB skbs, which tbf
    would otherwise split), and 1 ms of traffic at high rates so the timer is not the limit.
    The queue holds 20 ms of traffic: enough for TCP to keep a bottleneck busy through its
    backoffs, short enough that latency stays realistic. Both are at least two bursts.
    """
    burst = max(128 * 1024, rate_bits // 8 // 1000)
    limit = max(2 * burst, rate_bits // 8 * 20 // 1000)
    return burst, limit


def shape(ns: str, dev: str, rate_bits: int) -> None:
    """Shape the egress of ``dev`` (inside ``ns``) to ``rate_bits`` with a token bucket."""
    burst, limit = tbf_params(rate_bits)
    tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bits}bit",
       "burst", str(burst), "limit", str(limit), ns=ns)


def used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Networks of this machine's own IPv4 routes and addresses (read only; defaults skipped)."""
    nets = []
    lines = ip("-4", "route", "show", "table", "all").splitlines()
    lines += [" ".join(line.split()[3:4]) for line in ip("-4", "-o", "addr", "show").splitlines()]
    for line in lines:
        toks = line.split()
        if toks and toks[0] in _ROUTE_TYPES:
            toks = toks[1:]
        if not toks or toks[0] == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(toks[0], strict=False))
        except ValueError:
            continue
    return nets
