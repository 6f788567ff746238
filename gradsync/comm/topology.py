"""Which ranks share a host, and how fast each host's link is.

A :class:`Topology` is what the network-aware algorithms read: ``aware`` gives each host a
shard in proportion to its link (``../shared/ANCHORS.md``: unequal links), ``hierarchical``
reduces inside each host before anything crosses a host link. It comes from
:func:`gradsync.comm.probe_topology` (measured on the live group, probe.py) or from a small
JSON file, and is attached to a group with :func:`gradsync.comm.set_topology`:

    {"hosts": [{"name": "h0", "ranks": [0, 1], "rate_mbit": 1000},
               {"name": "h1", "ranks": [2, 3], "rate_mbit": 250}]}

Rates are link capacities in Mbit/s (10^6 bit/s) of payload, one per host, shared by the
host's ranks; a host may leave its rate out, and then no rate is used at all (host grouping
only). Only this data: nothing here talks to a peer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path


class TopologyError(ValueError):
    """A topology that does not describe the group: the message names what differs."""


@dataclass(frozen=True)
class HostLink:
    """One host: its ranks (group ranks, ascending) and its link in bytes/s (None: unknown)."""

    name: str
    ranks: tuple[int, ...]
    rate: float | None = None


@dataclass(frozen=True)
class Topology:
    """The hosts of a group, in the order of their lowest rank."""

    hosts: tuple[HostLink, ...]

    @property
    def world_size(self) -> int:
        return sum(len(h.ranks) for h in self.hosts)

    @property
    def measured(self) -> bool:
        """Every host has a link rate."""
        return all(h.rate is not None for h in self.hosts)

    @property
    def ranks_per_host(self) -> int | None:
        """L when every host runs L ranks, else None."""
        counts = {len(h.ranks) for h in self.hosts}
        return counts.pop() if len(counts) == 1 else None

    def host_of(self, rank: int) -> int:
        for i, host in enumerate(self.hosts):
            if rank in host.ranks:
                return i
        raise KeyError(f"rank {rank} is on no host of this topology")

    def rank_rates(self) -> list[float]:
        """Each rank's share of its host's link, bytes/s, indexed by rank."""
        rates = [0.0] * self.world_size
        for host in self.hosts:
            for r in host.ranks:
                rates[r] = (host.rate or 1.0) / len(host.ranks)
        return rates

    def unequal(self, tolerance: float = 0.2) -> bool:
        """Measured, and the fastest host link is more than ``1 + tolerance`` times the
        slowest (below that a ring's pace is within noise of the bound)."""
        if not self.measured or len(self.hosts) < 2:
            return False
        rates = [h.rate for h in self.hosts]
        return max(rates) > (1 + tolerance) * min(rates)

    # --- checking ------------------------------------------------------------------------

    def check(self) -> "Topology":
        """Return self if it is well formed whatever the group (names, ranks, rates), else
        raise :class:`TopologyError` naming what is wrong."""
        if not self.hosts:
            raise TopologyError("the topology lists no hosts")
        seen: dict[int, str] = {}
        names = set()
        for host in self.hosts:
            if host.name in names:
                raise TopologyError(f"host name {host.name!r} appears twice")
            names.add(host.name)
            if not host.ranks:
                raise TopologyError(f"host {host.name!r} has no ranks")
            for r in host.ranks:
                if r < 0:
                    raise TopologyError(f"host {host.name!r} lists rank {r}")
                if r in seen:
                    raise TopologyError(f"rank {r} is on two hosts, {seen[r]!r} and "
                                        f"{host.name!r}")
                seen[r] = host.name
            if host.rate is not None and not (math.isfinite(host.rate) and host.rate > 0):
                raise TopologyError(f"host {host.name!r} has rate_mbit "
                                    f"{host.rate * 8 / 1e6:g}; it must be a positive number")
        if any(h.rate is None for h in self.hosts) and not self.measured:
            if any(h.rate is not None for h in self.hosts):
                unrated = [h.name for h in self.hosts if h.rate is None]
                raise TopologyError(f"hosts {unrated} have no rate while others do")
        return self

    def validate(self, world_size: int) -> "Topology":
        """Return self if it describes a group of ``world_size`` ranks, else raise
        :class:`TopologyError` naming what differs."""
        self.check()
        for host in self.hosts:
            outside = [r for r in host.ranks if r >= world_size]
            if outside:
                raise TopologyError(f"host {host.name!r} lists rank {outside[0]}, but the group "
                                    f"has ranks 0..{world_size - 1}")
        missing = sorted(set(range(world_size)) - {r for h in self.hosts for r in h.ranks})
        if missing:
            raise TopologyError(f"ranks {missing} are on no host (the group has "
                                f"{world_size} ranks)")
        return self

    def fingerprint(self) -> int:
        """A 63-bit digest of the canonical JSON, to compare ranks' topologies."""
        digest = hashlib.blake2b(self.to_json().encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    # --- text ------------------------------------------------------------------------------

    def to_json(self) -> str:
        hosts = []
        for h in self.hosts:
            entry: dict = {"name": h.name, "ranks": list(h.ranks)}
            if h.rate is not None:
                entry["rate_mbit"] = round(h.rate * 8 / 1e6, 3)
            hosts.append(entry)
        return json.dumps({"hosts": hosts}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "topology") -> "Topology":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TopologyError(f"{source} is not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
            raise TopologyError(f"{source} needs an object with a list \"hosts\"")
        hosts = []
        for i, entry in enumerate(data["hosts"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("ranks"), list) \
                    or not all(isinstance(r, int) and not isinstance(r, bool)
                               for r in entry["ranks"]):
                raise TopologyError(f"{source}: host {i} needs \"ranks\", a list of integers")
            rate = entry.get("rate_mbit")
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
                raise TopologyError(f"{source}: host {i} has rate_mbit {rate!r}, not a number")
            hosts.append(HostLink(str(entry.get("name", f"h{i}")), tuple(sorted(entry["ranks"])),
                                  None if rate is None else float(rate) * 1e6 / 8))
        hosts.sort(key=lambda h: min(h.ranks, default=0))
        try:
            return cls(tuple(hosts)).check()
        except TopologyError as exc:
            raise TopologyError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Topology":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TopologyError(f"cannot read topology file {path}: {exc.strerror}") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    def describe(self) -> str:
        """One line per host: name, rate, ranks."""
        lines = []
        for h in self.hosts:
            rate = "not measured" if h.rate is None else f"{h.rate * 8 / 1e6:9.1f} Mbit/s"
            lines.append(f"{h.name:<6} {rate:>16}  ranks {','.join(map(str, h.ranks))}")
        return "\n".join(lines)

    @classmethod
    def uniform(cls, world_size: int, ranks_per_host: int = 1,
                rate: float | None = None) -> "Topology":
        """``world_size / ranks_per_host`` hosts of consecutive ranks, all at ``rate``."""
        if world_size % ranks_per_host:
            raise TopologyError(f"{world_size} ranks do not split into hosts of "
                                f"{ranks_per_host}")
        return cls(tuple(HostLink(f"h{i}", tuple(range(i * ranks_per_host,
                                                       (i + 1) * ranks_per_host)), rate)
                         for i in range(world_size // ranks_per_host)))


def host_key() -> int:
    """This process's host as a 63-bit number: host name plus network namespace, so that
    the namespaces of `gradsync lab` count as hosts (their ranks share no network stack).
    ``GRADSYNC_HOST`` overrides it: ranks with the same value are one host."""
    text = os.environ.get("GRADSYNC_HOST")
    if not text:
        try:
            netns = os.stat("/proc/self/ns/net").st_ino
        except OSError:
            netns = 0
        text = f"{socket.gethostname()}/{netns}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def group_hosts(keys: list[int]) -> Topology:
    """The hosts from every rank's :func:`host_key` (index = rank), named h0, h1, ... in the
    order of their lowest rank; no rates."""
    order: dict[int, list[int]] = {}
    for rank, key in enumerate(keys):
        order.setdefault(key, []).append(rank)
    return Topology(tuple(HostLink(f"h{i}", tuple(ranks))
                          for i, ranks in enumerate(order.values())))
