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
hand: in an emulated lab with shaped links the betas of all algorithms come out alike.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .ops import ReduceOp

ALGORITHMS = ("native", "reduce_broadcast", "ring", "tree", "halving_doubling")


def _loopback_defaults() -> dict[str, tuple[float, float]]:
    # (alpha s/message, beta s/byte) per algorithm: the mean of two sweeps' fits by
    # `gradsync bench collectives` (relative least squares, 1 KiB-64 MiB, docs/benchmarks.md).
    return {"native": (188e-6, 1 / 1.23e9), "ring": (292e-6, 1 / 1.03e9),
            "tree": (130e-6, 1 / 2.20e9), "halving_doubling": (260e-6, 1 / 1.09e9),
            "reduce_broadcast": (125e-6, 1 / 2.18e9)}


def shape(algorithm: str, n: float, p: int) -> tuple[float, float, float]:
    """(messages on the critical path, bytes on the wire, bytes reduced) of one all-reduce."""
    lg = math.ceil(math.log2(p))
    share = (p - 1) / p
    if algorithm == "reduce_broadcast":
        return 2 * (p - 1), 2 * (p - 1) * n, (p - 1) * n
    if algorithm == "tree":
        return 2 * lg, 2 * lg * n, lg * n
    if algorithm in ("ring", "native"):
        return 2 * (p - 1), 2 * share * n, share * n
    if algorithm == "halving_doubling":
        q = 1 << (p.bit_length() - 1)
        fold = (2, 2 * n, n) if q != p else (0, 0, 0)
        return (2 * math.log2(q) + fold[0], 2 * (q - 1) / q * n + fold[1],
                (q - 1) / q * n + fold[2])
    raise ValueError(f"unknown algorithm {algorithm!r}")


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


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up: first use sets up connections
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(group=None, *, small: int = 1 << 10, large: int = 8 << 20,
              repeat: int = 15) -> CostModel:
    """Fit a :class:`CostModel` on ``group`` (collective: every rank must call it).

    Two sizes per algorithm, median of ``repeat`` calls each, give its alpha and beta by a
    two-point fit; gamma is a local ``add_``. Rank 0's fit is broadcast so that every rank
    makes the same choices (they must: ranks that pick different algorithms deadlock).
    """
    from .collectives import all_reduce, broadcast  # late import: collectives use this module
    from .group import resolve

    group = resolve(group)
    p = group.size
    if p == 1:
        return CostModel()
    x, y = torch.ones(large // 4), torch.ones(large // 4)
    gamma = _median_time(lambda: x.add_(y), repeat) / large
    fitted = []
    for algorithm in ALGORITHMS:
        t = {size: _median_time(lambda b=torch.zeros(size // 4): all_reduce(
                 b, group=group, algorithm=algorithm), repeat) for size in (small, large)}
        m_small, w_small, r_small = shape(algorithm, small, p)
        _, w_large, r_large = shape(algorithm, large, p)
        beta = max(1e-13, (t[large] - t[small] - (r_large - r_small) * gamma)
                   / (w_large - w_small))
        alpha = max(1e-7, (t[small] - w_small * beta - r_small * gamma) / m_small)
        fitted += [alpha, beta]
    values = torch.tensor(fitted + [gamma], dtype=torch.float64)
    broadcast(values, src=0, group=group)
    v = values.tolist()
    return CostModel({a: (v[2 * i], v[2 * i + 1]) for i, a in enumerate(ALGORITHMS)}, v[-1])


def reduction_op(op: ReduceOp) -> ReduceOp:
    """AVG travels as SUM through every algorithm; the caller divides once at the end."""
    return ReduceOp.SUM if op is ReduceOp.AVG else op
