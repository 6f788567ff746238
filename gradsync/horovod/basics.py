"""Start-up, the world's shape, reduce ops and process sets of ``gradsync.horovod``.

Horovod keeps one global context; here that context is gradsync.comm's own world (the
engine's default group), so this module holds no state of its own beyond the process sets
a script registers. ``init()`` reads torchrun's variables (``gradsync run``, torchrun) or an
MPI launcher's (``mpiexec -n N``), as :func:`gradsync.comm.init_process_group` does.
"""

from __future__ import annotations

import os

from .. import comm
from ..comm.elastic import STORE_ENV
from ..comm.mpi_launcher import adopt_mpi_launcher
from ..comm.ops import as_op
from ..run.timeline import script_timeline

# Horovod's ops are module constants; gradsync's ReduceOp values serve as them.
Average = comm.ReduceOp.AVG
Sum = comm.ReduceOp.SUM
Min = comm.ReduceOp.MIN
Max = comm.ReduceOp.MAX
Product = comm.ReduceOp.PRODUCT
Adasum = "adasum"  # accepted as a name so scripts import; every call refuses it

ADASUM_ERROR = ("hvd.Adasum is not supported by gradsync.horovod: use op=hvd.Average "
                "(or hvd.Sum); gradsync has no Adasum reduction")


def resolve_op(op, average: bool | None = None, default=Average) -> comm.ReduceOp:
    """Horovod's (op, average) pair as one gradsync op.

    Raises:
        ValueError: both given, Adasum, or an unknown op.
    """
    if op is not None and average is not None:
        raise ValueError("pass either op= or the deprecated average=, not both")
    if op is None:
        op = default if average is None else (Average if average else Sum)
    if isinstance(op, str) and op.lower() == Adasum:
        raise ValueError(ADASUM_ERROR)
    return as_op(op)


# --- start-up -------------------------------------------------------------------------------

def init(comm_ranks=None, process_sets=None) -> None:
    """Join the world (idempotent): under ``gradsync run`` / torchrun, or under ``mpiexec``.

    Args:
        comm_ranks: Horovod's MPI sub-communicator; not supported (must be None).
        process_sets: ProcessSets to register now (each is created collectively).
    Raises:
        ValueError: ``comm_ranks`` given.
        RuntimeError: no launcher's environment (the message says what to run).
    """
    if comm_ranks is not None:
        raise ValueError("hvd.init(comm=...) is not supported: gradsync runs on the "
                         "launcher's whole world; use hvd.ProcessSet for sub-groups")
    if not comm.is_initialized():
        if in_elastic_job():  # `gradsync run --elastic`: join the job's generation
            from .elastic_job import join_job

            join_job()
        else:
            adopt_mpi_launcher()  # mpiexec/srun: RANK and WORLD_SIZE from MPI's variables
            comm.init_process_group()
            script_timeline(comm.world())  # HOROVOD_TIMELINE / `gradsync run --timeline`
    for process_set in process_sets or ():
        add_process_set(process_set)


def in_elastic_job() -> bool:
    """Whether this process is a worker of `gradsync run --elastic` (hvd.elastic)."""
    return bool(os.environ.get(STORE_ENV))


def shutdown() -> None:
    """Leave the world (idempotent); ``init()`` may join a new one afterwards."""
    if comm.is_initialized():
        comm.destroy_process_group()


def is_initialized() -> bool:
    return comm.is_initialized()


def _world() -> comm.Group:
    if not comm.is_initialized():
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return comm.world()


def size() -> int:
    return _world().size


def rank() -> int:
    return _world().rank


def _hosts() -> tuple[int, tuple[tuple[int, ...], ...]]:
    """(this rank's host index, the ranks of every host) from the world's topology (one
    host when it was not detected: a world of 1)."""
    group = _world()
    if group.topology is None:
        return 0, (tuple(range(group.size)),)
    hosts = tuple(h.ranks for h in group.topology.hosts)
    return group.topology.host_of(group.rank), hosts


def local_size() -> int:
    """How many ranks share this rank's host."""
    host, hosts = _hosts()
    return len(hosts[host])


def local_rank() -> int:
    """This rank's position among the ranks of its host."""
    host, hosts = _hosts()
    return hosts[host].index(_world().rank)


def cross_size() -> int:
    """How many hosts have a rank with this rank's local rank (the number of hosts when
    every host runs the same number of ranks)."""
    mine = local_rank()
    return sum(1 for ranks in _hosts()[1] if len(ranks) > mine)


def cross_rank() -> int:
    """This host's position among the hosts that have a rank with this local rank."""
    host, hosts = _hosts()
    mine = local_rank()
    return sum(1 for ranks in hosts[:host] if len(ranks) > mine)


def is_homogeneous() -> bool:
    """Whether every host runs the same number of ranks."""
    return len({len(r) for r in _hosts()[1]}) == 1


def mpi_enabled() -> bool:
    """Whether the world runs on the MPI engine (``mpiexec``, or GRADSYNC_ENGINE=mpi)."""
    return _world().engine.name == "mpi"


def mpi_built() -> bool:
    from importlib.util import find_spec

    return find_spec("mpi4py") is not None


def mpi_threads_supported() -> bool:
    """True on the MPI engine, which requires MPI_THREAD_MULTIPLE; False otherwise."""
    return mpi_enabled()


def gloo_enabled() -> bool:
    """Whether the world runs on torch.distributed (gloo for CPU tensors)."""
    return not mpi_enabled()


def gloo_built() -> bool:
    return True


def nccl_built() -> bool:
    return False


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


# --- process sets -----------------------------------------------------------------------------

class ProcessSet:
    """A sub-group of ranks (Horovod's ``hvd.ProcessSet([0, 2])``), backed by
    :func:`gradsync.comm.new_group`. Build it with :func:`add_process_set` or
    ``hvd.init(process_sets=[...])``: creating the group is collective.

    Attributes:
        ranks: global ranks of the members, ascending.
        group: the comm Group (None on non-members, and before registration).
    """

    def __init__(self, ranks):
        self.ranks = None if ranks is None else sorted(set(int(r) for r in ranks))
        self.group: comm.Group | None = None
        self._registered = ranks is None  # the global set needs no registration

    def resolve(self) -> comm.Group:
        """The group collectives run on.

        Raises:
            ValueError: not registered, or this rank is not a member.
        """
        if self.ranks is None:
            return _world()
        if not self._registered:
            raise ValueError(f"process set {self.ranks} is not registered: call "
                             "hvd.add_process_set() on every rank first")
        if self.group is None:
            raise ValueError(f"rank {rank()} is not in process set {self.ranks}")
        return self.group

    def included(self) -> bool:
        return self.ranks is None or rank() in self.ranks

    def size(self) -> int:
        return size() if self.ranks is None else len(self.ranks)

    def rank(self) -> int:
        """This rank's position in the set (-1 when not a member)."""
        if self.ranks is None:
            return rank()
        return self.ranks.index(rank()) if rank() in self.ranks else -1

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet({self.ranks})"


global_process_set = ProcessSet(None)


def add_process_set(process_set) -> ProcessSet:
    """Register a set (a ProcessSet or a list of ranks) on every rank (collective)."""
    if not isinstance(process_set, ProcessSet):
        process_set = ProcessSet(process_set)
    if process_set.ranks is None or process_set._registered:
        return process_set
    process_set.group = comm.new_group(process_set.ranks)
    process_set._registered = True
    return process_set


def remove_process_set(process_set: ProcessSet) -> bool:
    """Forget a registered set (its comm group ends with the world)."""
    found = process_set._registered and process_set.ranks is not None
    process_set.group, process_set._registered = None, False
    return found


def root_in(group: comm.Group, root_rank: int) -> int:
    """Horovod's roots are global ranks: ``root_rank``'s rank within ``group``.

    Raises:
        ValueError: ``root_rank`` is not a member.
    """
    if root_rank not in group.ranks:
        raise ValueError(f"root_rank {root_rank} is not in the process set {list(group.ranks)}")
    return group.ranks.index(root_rank)
