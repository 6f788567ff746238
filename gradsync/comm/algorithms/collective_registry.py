"""The tables of broadcast, all-gather and reduce-scatter algorithms, one per collective.

As registry.py is for all-reduce, :data:`COLLECTIVE_REGISTRY` is the one place these
collectives' ``algorithm=`` names are listed: the ``*_ALGORITHMS`` tuples (validation, the
benchmark sweeps) and what ``auto`` picks derive from it. A new algorithm is one function
with its collective's signature plus one line here. Buffers are 1-D and contiguous, ``p2p``
is the group's view (p ranks):

- broadcast: ``run(buf, root, p2p)`` copies position ``root``'s ``buf`` into everyone's.
- all_gather: ``run(stage, p2p)``: ``stage`` (p * k,) holds this rank's k elements at piece
  ``rank``; afterwards piece j holds rank j's.
- reduce_scatter: ``run(stage, op, p2p) -> (k,)``: ``stage`` (p * k,) holds this rank's
  input for rank j at piece j; returns piece ``rank`` reduced over every rank.

``run`` None is the engine's own collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .aware import aware_broadcast
from .registry import ALL_REDUCE_ALGORITHMS
from .ring import ring_reduce_scatter_pieces
from .shm import shm_all_gather_pieces, shm_broadcast, shm_reduce_scatter_pieces


@dataclass(frozen=True)
class CollectiveAlgorithm:
    """One algorithm of a data-moving collective.

    Args:
        name: what users pass as ``algorithm=``.
        run: the collective's signature (module docstring); None: the engine's own.
        one_host: what ``auto`` picks when the group's topology puts every rank on one host.
        across_hosts: what ``auto`` picks otherwise; where no entry says so, the table's
            first entry (the engine's own).
    """

    name: str
    run: Callable | None
    one_host: bool = False
    across_hosts: bool = False


def _table(*algorithms: CollectiveAlgorithm) -> dict[str, CollectiveAlgorithm]:
    return {a.name: a for a in algorithms}


COLLECTIVE_REGISTRY: dict[str, dict[str, CollectiveAlgorithm]] = {
    "broadcast": _table(
        CollectiveAlgorithm("native", None),
        # Packed depth-2 trees, pieces sized to the links of the group's topology.
        CollectiveAlgorithm("aware", aware_broadcast),
        CollectiveAlgorithm("shm", shm_broadcast, one_host=True),
    ),
    "all_gather": _table(
        CollectiveAlgorithm("native", None),
        CollectiveAlgorithm("shm", shm_all_gather_pieces, one_host=True),
    ),
    "reduce_scatter": _table(
        CollectiveAlgorithm("native", None),
        # gloo's own moves about an all-reduce's bytes (3 lab hosts at 1 Gbit, 8.4 MB:
        # 103.5 ms, the ring 57.5 ms; docs/benchmarks.md section 17).
        CollectiveAlgorithm("ring", ring_reduce_scatter_pieces, across_hosts=True),
        CollectiveAlgorithm("shm", shm_reduce_scatter_pieces, one_host=True),
    ),
}

# Concrete names, without "auto" (what the benchmark sweeps run).
BROADCAST_ALGORITHMS: tuple[str, ...] = tuple(COLLECTIVE_REGISTRY["broadcast"])
ALL_GATHER_ALGORITHMS: tuple[str, ...] = tuple(COLLECTIVE_REGISTRY["all_gather"])
REDUCE_SCATTER_ALGORITHMS: tuple[str, ...] = tuple(COLLECTIVE_REGISTRY["reduce_scatter"])

# What ``algorithm=`` accepts, per collective, all-reduce included.
CHOICES: dict[str, tuple[str, ...]] = {
    "all_reduce": ALL_REDUCE_ALGORITHMS,
    **{name: ("auto", *table) for name, table in COLLECTIVE_REGISTRY.items()},
}


def check_collective_algorithm(collective: str, name: str) -> str:
    """Return ``name`` if ``collective`` has such an algorithm (or it is "auto").

    Raises:
        ValueError: unknown collective, or unknown algorithm (the message lists the names).
    """
    if collective not in CHOICES:
        raise ValueError(f"unknown collective {collective!r}; choose one of "
                         f"{', '.join(CHOICES)}")
    if name not in CHOICES[collective]:
        raise ValueError(f"unknown {collective} algorithm {name!r}; choose one of "
                         f"{', '.join(CHOICES[collective])}")
    return name


def choose_collective_algorithm(collective: str, name: str, one_host: bool
                                ) -> CollectiveAlgorithm:
    """The entry ``name`` stands for (checked); ``auto``: the one-host entry when every rank
    of the group is on one host, else the across-hosts entry, or the first (the engine's
    own) where there is none.

    Raises:
        ValueError: as :func:`check_collective_algorithm`; ``all_reduce`` is not here
            (the cost model chooses its algorithm).
    """
    check_collective_algorithm(collective, name)
    table = COLLECTIVE_REGISTRY.get(collective)
    if table is None:
        raise ValueError(f"{collective} algorithms are in algorithms/registry.py")
    if name != "auto":
        return table[name]
    if one_host:
        return next(a for a in table.values() if a.one_host)
    return next((a for a in table.values() if a.across_hosts), next(iter(table.values())))
