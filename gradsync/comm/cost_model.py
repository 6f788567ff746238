"""The alpha-beta-gamma cost model behind ``algorithm="auto"``.

Formulas after Thakur, Rabenseifner & Gropp (2005) (see shared/ANCHORS.md): with p processes
and n bytes, each algorithm sends some number of messages on its critical path, puts some
number of bytes on the wire and reduces some number of bytes:

    t = messages(p) * alpha + wire_bytes(n, p) * beta + reduced_bytes(n, p) * gamma

The formulas are textbook; the constants are not. On a real network beta is the link and is
the same for every algorithm, but gradsync's own algorithms drive each message from Python
while the engine's ``native`` ring runs in C++, and on loopback the "wire" is memory copies.
So every algorithm gets its own alpha and beta, fitted to measurements, and gamma is shared.

The defaults were fitted to `gradsync bench collectives` sweeps on a 2-core machine over
loopback (p = 2; docs/benchmarks.md). :func:`calibrate` fits them on the cluster at
hand (calibrate.py): in an emulated lab with shaped links the betas come out alike. The
formulas live with their algorithms (``shape`` in each file of ``algorithms/``), the
defaults in ``algorithms/registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .algorithms.aware import aware_bound
from .algorithms.registry import ALGORITHMS, REGISTRY
from .algorithms.ring import bus_factor
from .topology import Topology

# Chosen only when the topology calls for them (unequal links, several ranks per host, every
# rank on one host).
NETWORK_ALGORITHMS = ("aware", "hierarchical", "shm")


def _loopback_defaults() -> dict[str, tuple[float, float]]:
    return {name: algo.loopback for name, algo in REGISTRY.items()}


def shape(algorithm: str, n: float, p: int) -> tuple[float, float, float]:
    """(messages on the critical path, bytes on the wire, bytes reduced) of one all-reduce."""
    if algorithm not in REGISTRY:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return REGISTRY[algorithm].shape(n, p)


@dataclass
class CostModel:
    """Per-algorithm (alpha, beta) in seconds per message and per wire byte; shared gamma."""

    links: dict[str, tuple[float, float]] = field(default_factory=_loopback_defaults)
    gamma: float = 1 / 13.5e9

    def predict(self, algorithm: str, nbytes: int, p: int) -> float:
        """Predicted seconds for one all-reduce of ``nbytes`` over ``p`` ranks."""
        if p <= 1 or nbytes == 0:
            return 0.0
        messages, wire, reduced = shape(algorithm, float(nbytes), p)
        alpha, beta = self.links[algorithm]
        return messages * alpha + wire * beta + reduced * self.gamma

    def choose(self, nbytes: int, p: int, candidates: tuple[str, ...] | None = None,
               topology: Topology | None = None) -> str:
        """The candidate with the lowest predicted time.

        Without a measured topology that calls for them (:func:`network_candidates`), the
        network-aware algorithms are not candidates, so equal links keep today's choices.
        """
        extra = network_candidates(topology)
        if candidates is None:
            candidates = tuple(a for a in ALGORITHMS if a not in NETWORK_ALGORITHMS) + extra
        if not extra or len(topology.hosts) == 1:  # one host: the loopback model holds
            return min(candidates, key=lambda algo: self.predict(algo, nbytes, p))
        return min(candidates, key=lambda algo: self.predict_on(topology, algo, nbytes))

    def predict_on(self, topology: Topology, algorithm: str, nbytes: int) -> float:
        """Predicted seconds on ``topology``: the loopback model's per-message and
        per-byte costs (the ranks' CPU work) or the time the bytes need on the host
        links, whichever is longer, since the two overlap."""
        p = topology.world_size
        local = self.predict(algorithm, nbytes, p)
        return max(local, network_time(topology, algorithm, nbytes))


def network_candidates(topology: Topology | None) -> tuple[str, ...]:
    """The network-aware algorithms worth predicting on ``topology``: ``shm`` when every
    rank is on one host, ``aware`` for unequal links, ``hierarchical`` for several ranks per
    host (several hosts, measured links)."""
    if topology is None:
        return ()
    if len(topology.hosts) == 1:
        return ("shm",) if topology.world_size > 1 else ()
    if not topology.measured:
        return ()
    extra = []
    if topology.unequal():
        extra.append("aware")
    if (topology.ranks_per_host or 0) > 1:
        extra.append("hierarchical")
    return tuple(extra)


def network_time(topology: Topology, algorithm: str, nbytes: int) -> float:
    """Seconds the busiest host link needs for one all-reduce of ``nbytes`` (a lower bound
    for that algorithm on that network).

    ``aware``: the bandwidth-aware bound over the ranks' shares of their links.
    ``hierarchical``: the inter-host all-reduce of every local shard, 2(h-1)/h * S over the
    slowest host link (aware's bound over the hosts when links are unequal). The flat
    algorithms: each rank's wire bytes, paced by the slowest link on the ring.
    """
    hosts = [h.rate for h in topology.hosts]
    if algorithm == "aware":
        return aware_bound(nbytes, topology.rank_rates())
    if algorithm == "hierarchical":
        h = len(hosts)
        if topology.unequal():
            return aware_bound(nbytes, hosts)
        return float(bus_factor(h) * nbytes) / min(hosts)
    _, wire, _ = shape(algorithm, float(nbytes), topology.world_size)
    return wire / min(hosts)


DEFAULT_COST_MODEL = CostModel()
