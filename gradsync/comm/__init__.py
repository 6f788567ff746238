"""gradsync's communication layer: the only package that imports torch.distributed.

Start-up (:func:`init_process_group`), groups, the collective primitives with their
``*_async`` twins, gradsync's own all-reduce algorithms and the cost model that picks one.

The modules read downhill, without import circles (a test walks them):

    ops, work, errors          leaves: reduce ops and operation codes, the Work handle
    topology                   leaf: which ranks share a host, each host's link (data only)
    engine, mpi_launcher, mpi  the seam: start-up, point-to-point, native collectives;
                               torch.distributed's, and MPI's (its launcher read first)
    engines                    the one table of engines; choosing one at start-up
    monitor, group             heartbeats; the Group every call takes, and start-up
    p2p, algorithms/           point-to-point in a group; gradsync's own algorithms and
                               their tables: registry.py (all-reduce), collective_registry.py
                               (broadcast, all-gather, reduce-scatter)
    cost_model, check          the alpha-beta-gamma choice; check mode
    collectives                the primitives, on the engine or on an own algorithm
    per_rank                   all_gather, gather, scatter, reduce_scatter (a list per rank)
    shared_buckets             buffers in shared memory, all-reduced where they lie
    probe                      measuring the topology on the live group; agreeing on it
    calibrate, reference       fitting the cost model; torch's DDP as a baseline
    elastic                    generations of an elastic world through a launcher-hosted store
"""

from .algorithms.collective_registry import (ALL_GATHER_ALGORITHMS, COLLECTIVE_REGISTRY,
                                             REDUCE_SCATTER_ALGORITHMS,
                                             check_collective_algorithm)
from .algorithms.registry import (ALL_REDUCE_ALGORITHMS, REGISTRY, AllReduceAlgorithm,
                                  check_algorithm)
from .algorithms.ring import bus_factor
from .calibrate import calibrate
from .check import verify_tensors
from .collectives import (BROADCAST_ALGORITHMS, Work, all_reduce, all_reduce_async, barrier,
                          broadcast, broadcast_async, dist_sum, reduce, reduce_async)
from .per_rank import (all_gather, all_gather_async, gather, gather_async, reduce_scatter,
                       reduce_scatter_async, scatter, scatter_async)
from .shared_buckets import SharedBuckets
from .cost_model import DEFAULT_COST_MODEL, CostModel, network_candidates
from .engine import Engine
from .engines import ENGINE_REGISTRY, ENGINES, check_engine, choose_engine
from .mpi_launcher import adopt_mpi_launcher
from .errors import CollectiveMismatchError, CommError, CommTimeoutError, PeerLostError
from .group import (CommStats, Group, destroy_process_group, get_rank, get_world_size,
                    init_process_group, is_initialized, new_group, set_step, world)
from . import reference
from .probe import detect_topology, probe_topology, set_topology
from .topology import HostLink, Topology, TopologyError
from .ops import ReduceOp, all_finite
from .p2p import irecv, isend, recv, send

__all__ = [
    "SharedBuckets", "ALL_GATHER_ALGORITHMS", "COLLECTIVE_REGISTRY", "ENGINES",
    "ENGINE_REGISTRY", "REDUCE_SCATTER_ALGORITHMS", "adopt_mpi_launcher", "bus_factor",
    "check_collective_algorithm", "check_engine", "choose_engine",
    "ALL_REDUCE_ALGORITHMS", "AllReduceAlgorithm", "BROADCAST_ALGORITHMS", "CollectiveMismatchError", "Engine",
    "HostLink", "Topology", "TopologyError", "detect_topology", "probe_topology",
    "set_topology", "network_candidates", "DEFAULT_COST_MODEL",
    "REGISTRY", "check_algorithm", "reference", "CommError", "CommStats",
    "CommTimeoutError", "CostModel", "Group", "PeerLostError", "ReduceOp", "Work",
    "all_finite", "all_gather",
    "all_gather_async", "all_reduce", "all_reduce_async", "barrier", "broadcast",
    "broadcast_async", "calibrate", "dist_sum", "destroy_process_group", "gather", "gather_async",
    "get_rank", "get_world_size", "init_process_group", "irecv", "is_initialized", "isend",
    "new_group", "recv", "reduce", "set_step",
    "reduce_async", "reduce_scatter", "reduce_scatter_async", "scatter", "scatter_async", "send",
    "verify_tensors", "world",
]
