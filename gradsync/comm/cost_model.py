"""The alpha-beta-gamma cost model behind ``algorithm="auto"``.

Formulas after Thakur, Rabenseifner & Gropp (2005) (see shared/ANCHORS.md), with p processes
and n bytes: alpha is the latency of one message, beta the time per byte on the wire, gamma
the time per byte reduced. gradsync's own algorithms send messages from Python through the
engine's point-to-point layer; the engine's ``native`` all-reduce is a C++ ring with a larger
fixed cost per call but no Python per message, so it gets its own alpha and beta.

The defaults were measured on a 2-core machine over loopback (docs/benchmarks.md);
:func:`calibrate` measures them on the machine at hand.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .ops import ReduceOp

ALGORITHMS = ("native", "reduce_broadcast", "ring", "tree", "halving_doubling")


@dataclass
class CostModel:
    """Seconds per message (alpha), per byte sent (beta), per byte reduced (gamma)."""

    alpha: float = 60e-6
    beta: float = 1 / 1.5e9
    gamma: float = 1 / 4e9
    native_alpha: float = 250e-6
    native_beta: float = 1 / 1.8e9

    def predict(self, algorithm: str, nbytes: int, p: int) -> float:
        """Predicted seconds for one all-reduce of ``nbytes`` over ``p`` ranks."""
        if p <= 1 or nbytes == 0:
            return 0.0
        n, a, b, g = float(nbytes), self.alpha, self.beta, self.gamma
        lg = math.ceil(math.log2(p))
        share = (p - 1) / p
        if algorithm == "reduce_broadcast":
            return 2 * (p - 1) * (a + n * b) + (p - 1) * n * g
        if algorithm == "tree":
            return 2 * lg * (a + n * b) + lg * n * g
        if algorithm == "ring":
            return 2 * (p - 1) * a + 2 * n * share * b + n * share * g
        if algorithm == "halving_doubling":
            q = 1 << (p.bit_length() - 1)
            fold = 0.0 if q == p else 2 * (a + n * b) + n * g
            return 2 * math.log2(q) * a + 2 * n * (q - 1) / q * b + n * (q - 1) / q * g + fold
        if algorithm == "native":
            return self.native_alpha * (p - 1) + 2 * n * share * self.native_beta + n * share * g
        raise ValueError(f"unknown algorithm {algorithm!r}")

    def choose(self, nbytes: int, p: int) -> str:
        """The algorithm with the lowest predicted time."""
        return min(ALGORITHMS, key=lambda algo: self.predict(algo, nbytes, p))


def _time(fn, repeat: int) -> float:
    fn()  # warm-up: first use sets up connections
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def calibrate(group=None, *, small: int = 1 << 10, large: int = 8 << 20,
              repeat: int = 10) -> CostModel:
    """Measure a :class:`CostModel` on ``group`` (collective: every rank must call it).

    Two sizes per transport give latency and bandwidth by a two-point fit; the reduction
    rate is a local ``add_``. Ranks agree on the result (rank 0's figures are broadcast).
    """
    from .collectives import all_reduce, broadcast  # late import: collectives use this module
    from .group import resolve

    group = resolve(group)
    p = group.size
    if p == 1:
        return CostModel()
    steps = 2 * (p - 1)
    t = {}
    for size in (small, large):
        buf = torch.zeros(size // 4)
        t[("ring", size)] = _time(lambda: all_reduce(buf, group=group, algorithm="ring"), repeat)
        t[("native", size)] = _time(lambda: all_reduce(buf, group=group, algorithm="native"),
                                    repeat)
    x, y = torch.ones(large // 4), torch.ones(large // 4)
    gamma = _time(lambda: x.add_(y), repeat) / large
    share = (p - 1) / p
    per_byte = (t[("ring", large)] - t[("ring", small)]) / (large - small)
    beta = max(1e-12, (per_byte - share * gamma) / (2 * share))
    alpha = max(1e-7, (t[("ring", small)] - 2 * share * small * beta) / steps)
    nper_byte = (t[("native", large)] - t[("native", small)]) / (large - small)
    native_beta = max(1e-12, (nper_byte - share * gamma) / (2 * share))
    native_alpha = max(1e-7, (t[("native", small)] - 2 * share * small * native_beta) / (p - 1))
    fitted = torch.tensor([alpha, beta, gamma, native_alpha, native_beta], dtype=torch.float64)
    broadcast(fitted, src=0, group=group)
    return CostModel(*fitted.tolist())


def reduction_op(op: ReduceOp) -> ReduceOp:
    """AVG travels as SUM through every algorithm; the caller divides once at the end."""
    return ReduceOp.SUM if op is ReduceOp.AVG else op
