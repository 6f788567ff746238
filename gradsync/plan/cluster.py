"""The cluster a plan is for: hosts, ranks per host, each host's link, the latency.

Described on the command line (``--hosts 64 --procs-per-host 8 --rate 10gbit --latency-us
5``, ``--rates`` for one rate per host) or read from a topology file (`gradsync bench
topology --save`, or the lab's links). ``cores``: the CPU cores every rank of the cluster
shares, when they share one machine (the lab: its hosts are namespaces of this machine), so
that compute slows down when more ranks than cores run; None on a real cluster.
``machine``: what a message end, a loop and a wake-up cost on those cores (machine.py:
this machine's calibrated figures where `gradsync plan --lab --calibrate` saved them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from ..comm.topology import HostLink, Topology
from .machine import DEFAULT, SharedCores, here


# A link's rate counts every byte of a frame; TCP's payload is 1448 of each full frame's 1514
# (MTU 1500 with timestamps, plus Ethernet's 14-byte header): the lab's probe measures a
# 100 Mbit link at about 96.5 Mbit/s.
PAYLOAD = 1448 / 1514


@dataclass(frozen=True)
class Cluster:
    rates: tuple[float, ...]
    """Each host's link in bytes/s of payload."""
    procs_per_host: int = 1
    latency_s: float = 50e-6
    """One-way latency of a message between hosts."""
    cores: int | None = None
    machine: SharedCores = DEFAULT

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0:
            raise ValueError("a cluster needs at least one host, each with a positive rate")
        if self.procs_per_host < 1:
            raise ValueError(f"--procs-per-host must be at least 1, not {self.procs_per_host}")
        if self.latency_s < 0:
            raise ValueError("--latency-us must be >= 0")

    @property
    def hosts(self) -> int:
        return len(self.rates)

    @property
    def ranks(self) -> int:
        return self.hosts * self.procs_per_host

    @property
    def unequal(self) -> bool:
        return max(self.rates) > 1.2 * min(self.rates)

    def slowdown(self, ranks: int | None = None) -> float:
        """How much slower a rank computes than alone on a core: ranks / cores when they
        share fewer cores than there are ranks, else 1."""
        ranks = self.ranks if ranks is None else ranks
        return max(1.0, ranks / self.cores) if self.cores else 1.0

    @cached_property  # the predictions read it once per bucket
    def topology(self) -> Topology:
        L = self.procs_per_host
        return Topology(tuple(HostLink(f"h{i}", tuple(range(i * L, (i + 1) * L)), rate)
                              for i, rate in enumerate(self.rates)))

    def describe(self) -> str:
        mbit = sorted({round(r * 8 / 1e6) for r in self.rates})
        links = "/".join(f"{m:g}" for m in mbit)
        return (f"{self.hosts} hosts x {self.procs_per_host} ranks, links {links} Mbit/s of payload, "
                f"latency {self.latency_s * 1e6:g} us")

    @classmethod
    def parse(cls, hosts: int, procs_per_host: int = 1, rate: str = "1gbit",
              rates: str | None = None, latency_us: float = 50.0, shared: bool = False
              ) -> "Cluster":
        """From the flags; ``shared``: every rank runs on this machine (the lab)."""
        from ..lab.netns import LabError, parse_rate

        texts = rates.split(",") if rates else [rate] * hosts
        if len(texts) != hosts:
            raise ValueError(f"--rates lists {len(texts)} rates for {hosts} hosts")
        try:
            parsed = tuple(parse_rate(t) / 8 * PAYLOAD for t in texts)
        except LabError as exc:
            raise ValueError(str(exc)) from None
        return cls(parsed, procs_per_host, latency_us * 1e-6,
                   os.cpu_count() if shared else None, here() if shared else DEFAULT)

    @classmethod
    def from_topology(cls, topology: Topology, latency_us: float = 50.0,
                      shared: bool = False) -> "Cluster":
        if not topology.measured or topology.ranks_per_host is None:
            raise ValueError("the topology must give every host a rate and the same number "
                             "of ranks")
        return cls(tuple(h.rate for h in topology.hosts), topology.ranks_per_host,
                   latency_us * 1e-6, os.cpu_count() if shared else None,
                   here() if shared else DEFAULT)
