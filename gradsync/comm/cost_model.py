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

from .algorithms.registry import ALGORITHMS, REGISTRY


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

    def choose(self, nbytes: int, p: int, candidates: tuple[str, ...] = ALGORITHMS) -> str:
        """The candidate with the lowest predicted time."""
        return min(candidates, key=lambda algo: self.predict(algo, nbytes, p))


DEFAULT_COST_MODEL = CostModel()
