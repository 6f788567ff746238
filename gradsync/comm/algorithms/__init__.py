"""All-reduce algorithms gradsync implements on the engine's point-to-point transfers.

Each is a function ``fn(buf, op, p2p)`` that reduces the 1-D contiguous tensor ``buf`` in place
across ``p2p.size`` ranks with ``op`` in {SUM, MAX, MIN, PRODUCT} (AVG arrives as SUM; the caller
divides), and a ``shape(n, p)`` giving its cost formula. Every element of the result is
computed on exactly one rank and then copied to the others, which is what makes the results
bitwise identical across ranks. ``registry.py`` is the one table of them;
``collective_registry.py`` holds the tables of the broadcast, all-gather and reduce-scatter
algorithms (on the same substrate).

``reduce_broadcast`` is the naive version and the oracle the tests hold the others to.
"""

from .aware import (aware_all_reduce, aware_bound, aware_broadcast, aware_broadcast_bound,
                    aware_weights)
from .collective_registry import (ALL_GATHER_ALGORITHMS, BROADCAST_ALGORITHMS,
                                  COLLECTIVE_REGISTRY, REDUCE_SCATTER_ALGORITHMS,
                                  CollectiveAlgorithm, check_collective_algorithm)
from .halving_doubling import halving_doubling_all_reduce
from .hierarchical import hierarchical_all_reduce
from .reduce_broadcast import reduce_broadcast_all_reduce
from .registry import (ALGORITHMS, ALL_REDUCE_ALGORITHMS, REGISTRY, AllReduceAlgorithm,
                       check_algorithm)
from .ring import bus_factor, ring_all_reduce, ring_reduce_scatter, ring_reduce_scatter_pieces
from .shm import (shm_all_gather, shm_all_gather_pieces, shm_all_reduce, shm_broadcast,
                  shm_reduce_scatter, shm_reduce_scatter_pieces)
from .tree import tree_all_reduce

__all__ = ["ALGORITHMS", "ALL_GATHER_ALGORITHMS", "ALL_REDUCE_ALGORITHMS", "AllReduceAlgorithm",
           "BROADCAST_ALGORITHMS", "COLLECTIVE_REGISTRY", "CollectiveAlgorithm",
           "REDUCE_SCATTER_ALGORITHMS", "REGISTRY",
           "aware_all_reduce", "aware_bound", "aware_broadcast", "aware_broadcast_bound",
           "aware_weights", "bus_factor", "check_algorithm", "check_collective_algorithm",
           "halving_doubling_all_reduce", "hierarchical_all_reduce",
           "reduce_broadcast_all_reduce", "ring_all_reduce", "ring_reduce_scatter",
           "ring_reduce_scatter_pieces", "shm_all_gather", "shm_all_gather_pieces",
           "shm_all_reduce", "shm_broadcast", "shm_reduce_scatter", "shm_reduce_scatter_pieces",
           "tree_all_reduce"]
