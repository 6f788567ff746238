"""The one table of all-reduce algorithms: name -> implementation, cost formula, defaults.

Everything that lists algorithms derives from :data:`REGISTRY`: ``ALL_REDUCE_ALGORITHMS``
(and so the CLI's choices and every validation), the cost model's candidates and its
loopback constants, check mode's codes, and the benchmark sweeps. A new algorithm is one new
file in this folder (``fn(buf, op, p2p)`` and its ``shape(n, p)``) plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .aware import aware_all_reduce, aware_shape
from .halving_doubling import halving_doubling_all_reduce, halving_doubling_shape
from .hierarchical import hierarchical_all_reduce, hierarchical_shape
from .reduce_broadcast import reduce_broadcast_all_reduce, reduce_broadcast_shape
from .ring import ring_all_reduce, ring_shape
from .shm import shm_all_reduce, shm_shape
from .tree import tree_all_reduce, tree_shape

Shape = Callable[[float, int], tuple[float, float, float]]


@dataclass(frozen=True)
class AllReduceAlgorithm:
    """One all-reduce algorithm.

    Args:
        name: what users pass as ``algorithm=`` / ``--algorithm``.
        run: ``run(buf, op, p2p)`` reduces the 1-D ``buf`` in place with SUM/MAX/MIN/PRODUCT
            over ``p2p``'s ranks; None: the engine's own all-reduce.
        shape: ``shape(n, p)`` -> (messages on the critical path, wire bytes, reduced bytes)
            of one all-reduce of ``n`` bytes on ``p`` ranks (the alpha-beta-gamma model).
        loopback: default (alpha s/message, beta s/byte), fitted to `gradsync bench
            collectives` sweeps over loopback on the 2-core machine (docs/benchmarks.md).
    """

    name: str
    run: Callable | None
    shape: Shape
    loopback: tuple[float, float]


REGISTRY: dict[str, AllReduceAlgorithm] = {a.name: a for a in (
    AllReduceAlgorithm("native", None, ring_shape, (188e-6, 1 / 1.23e9)),
    AllReduceAlgorithm("ring", ring_all_reduce, ring_shape, (292e-6, 1 / 1.03e9)),
    AllReduceAlgorithm("tree", tree_all_reduce, tree_shape, (130e-6, 1 / 2.20e9)),
    AllReduceAlgorithm("halving_doubling", halving_doubling_all_reduce, halving_doubling_shape,
                       (260e-6, 1 / 1.09e9)),
    # The naive one, and the oracle the tests hold the others to.
    AllReduceAlgorithm("reduce_broadcast", reduce_broadcast_all_reduce, reduce_broadcast_shape,
                       (125e-6, 1 / 2.18e9)),
    # Ring's constants: on one machine its three phases are rings.
    AllReduceAlgorithm("hierarchical", hierarchical_all_reduce, hierarchical_shape,
                       (292e-6, 1 / 1.03e9)),
    # Shares sized to each host's link (topology.py); equal shares without one. Fitted
    # against ring at p = 2 (aware/ring: 0.9x at 1 MiB, 1.15x at 16 MiB), not swept.
    AllReduceAlgorithm("aware", aware_all_reduce, aware_shape, (250e-6, 1 / 1.09e9)),
    # One host only (ValueError otherwise). Fitted to 2 ranks, float32, medians of
    # 300 x 1 KiB (40 us) and 40 x 32 MiB (12.1-12.6 ms; 20.7 ms on a busier run).
    AllReduceAlgorithm("shm", shm_all_reduce, shm_shape, (20e-6, 1 / 6.0e9)),
)}

ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)           # concrete: what "auto" chooses from
ALL_REDUCE_ALGORITHMS: tuple[str, ...] = ("auto", *ALGORITHMS)


def check_algorithm(name: str) -> str:
    """Return ``name`` if it is an all-reduce algorithm; else raise ValueError listing them."""
    if name not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {name!r}; choose one of "
                         f"{', '.join(ALL_REDUCE_ALGORITHMS)}")
    return name
