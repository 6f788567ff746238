"""MPI as an engine (mpi4py): the :class:`~gradsync.comm.engine.Engine` protocol on MPI.

Launch with an MPI launcher instead of torchrun; the world is ``MPI.COMM_WORLD``::

    mpiexec -n 4 python train.py      # MPICH's hydra (the ``mpich`` wheel puts it in the venv)

Tensors travel as views, not copies: a contiguous CPU tensor's ``numpy()`` shares its memory
and is a buffer MPI reads and writes in place. Point-to-point transfers and the collectives
that only move data (broadcast, gathers, scatter) see every tensor as bytes, so dtypes numpy
lacks (bfloat16) travel too. Reductions need a type MPI knows: float16 and bfloat16 are
reduced in a float32 copy and rounded back once (never summed as raw bytes).

mpi4py is imported inside functions, so importing gradsync never needs it; a launcher's
environment is recognised without it (mpi_launcher.py: :func:`mpi_environment`,
:func:`adopt_mpi_launcher`).

MPI has no timeouts: a wait blocks until the peer answers, and a process that dies takes the
job down through the launcher (hydra kills the other ranks), instead of a CommTimeoutError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .mpi_launcher import MISSING, adopt_mpi_launcher, check_engines_agree, mpi_environment
from .mpi_launcher import import_mpi as _mpi
from .ops import ReduceOp, wire_op

__all__ = ["MISSING", "MPI_ENGINE", "Communicator", "MPIEngine", "MPIWork", "adopt_mpi_launcher",
           "check_engines_agree", "mpi_environment"]

# MPI has no 16-bit float type it can reduce everywhere (bfloat16 none at all): reduce these
# in float32, which also sums more exactly, then round back once, identically on every rank.
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

_NOT_ELASTIC = "the MPI engine has no store: elastic worlds need --engine torch"


@dataclass(eq=False)
class Communicator:
    """An MPI communicator and the global ranks of its members, in communicator-rank order;
    the ``pg`` of an MPI group. The engine speaks global ranks, MPI local ones."""

    comm: Any
    ranks: tuple[int, ...]
    _local: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self._local = {g: i for i, g in enumerate(self.ranks)}

    def local(self, global_rank: int) -> int:
        try:
            return self._local[global_rank]
        except KeyError:
            raise ValueError(f"rank {global_rank} is not a member of this MPI group "
                             f"{list(self.ranks)}") from None


class MPIWork:
    """Handle of an MPI request: ``wait()`` / ``is_completed()``. It keeps the buffers MPI
    reads or writes alive until then, and runs ``after`` (copying a staging buffer out,
    rounding an upcast back) once, when the request completes."""

    def __init__(self, request, keep: tuple = (), after: Callable[[], object] | None = None):
        self._request = request
        self._keep = keep
        self._after = after
        self._done = False

    def _complete(self) -> None:
        self._done = True
        self._keep = ()
        if self._after is not None:
            self._after()
            self._after = None

    def wait(self) -> bool:
        if not self._done:
            self._request.Wait()
            self._complete()
        return True

    def is_completed(self) -> bool:
        if not self._done and self._request.Test():
            self._complete()
        return self._done


def _view(tensor: torch.Tensor):
    """``tensor`` as a numpy array over the same memory (no copy)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"the MPI engine carries CPU tensors only, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("the MPI engine needs contiguous tensors (MPI reads the memory as is)")
    # detach(): parameters require grad, and numpy() refuses those; the storage is the same.
    return tensor.detach().reshape(-1).numpy()


def _bytes(tensor: torch.Tensor):
    """``tensor``'s memory as uint8 (no copy), for transfers that do not look at values."""
    return _view(tensor.detach().reshape(-1).view(torch.uint8))


def _stage(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A (p * numel,) buffer for p per-rank tensors: MPI's gathers want one block of memory."""
    return torch.empty(len(tensors) * like.numel(), dtype=like.dtype)


def _unstage(stage: torch.Tensor, tensors: list[torch.Tensor]) -> Callable[[], None]:
    def copy_out():
        for t, piece in zip(tensors, stage.view(len(tensors), -1)):
            t.copy_(piece.view_as(t))
    return copy_out


class MPIEngine:
    """The Engine protocol on mpi4py; ``pg`` is a :class:`Communicator`."""

    name = "mpi"

    def __init__(self):
        self._world: Communicator | None = None  # one per process, so Group caches by it

    # -- start-up ---------------------------------------------------------------------------

    def rendezvous(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                   backend: str | None):
        """The launcher already joined the world (importing mpi4py initialises MPI); the
        address and port are not used. Returns None: there is no store, so no heartbeats.

        Raises:
            RuntimeError: rank or size disagree with the launcher's, or no mpi4py.
        """
        comm = _mpi().COMM_WORLD
        if (comm.Get_rank(), comm.Get_size()) != (rank, world_size):
            raise RuntimeError(f"the MPI launcher made this rank {comm.Get_rank()} of "
                               f"{comm.Get_size()}, but rank {rank} of {world_size} was asked "
                               f"for: start with `mpiexec -n {world_size}`")
        return None

    def adopt(self):
        return None

    # An MPI world is fixed by its launcher: there is no store to rejoin through, so elastic
    # generations (elastic.py) run on torch.distributed only.
    def serve_store(self, addr, port, timeout_s, world_size=None):
        raise RuntimeError(_NOT_ELASTIC)

    def connect_store(self, addr, port, timeout_s, world_size=None):
        raise RuntimeError(_NOT_ELASTIC)

    def join(self, store, prefix, rank, world_size, timeout_s, backend):
        raise RuntimeError(_NOT_ELASTIC)

    def open_store(self, path, timeout_s):
        raise RuntimeError(_NOT_ELASTIC)

    def is_initialized(self) -> bool:
        # Under a launcher the world exists before mpi4py is imported: joining it is free,
        # so init_process_group adopts it and needs no RANK / MASTER_PORT.
        if mpi_environment():
            return True
        import sys
        MPI = sys.modules.get("mpi4py.MPI")
        return MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()

    def world(self):
        if self._world is None:
            MPI = _mpi()
            # The comm thread runs own algorithms while the caller may start engine
            # collectives: both threads call MPI (mpi4py asks for this level by default).
            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                raise RuntimeError("the MPI engine needs MPI_THREAD_MULTIPLE; leave "
                                   "mpi4py.rc.thread_level at 'multiple'")
            comm = MPI.COMM_WORLD
            self._world = Communicator(comm, tuple(range(comm.Get_size())))
        return self._world, self._world.comm.Get_rank(), self._world.comm.Get_size()

    def new_group(self, ranks: list[int], timeout_s: float):
        """A communicator of ``ranks`` (collective over the world, like torch's new_group);
        None in processes outside it."""
        world, _, _ = self.world()
        members = world.comm.Get_group().Incl(list(ranks))
        try:
            comm = world.comm.Create(members)  # COMM_NULL outside ``ranks``
        finally:
            members.Free()
        if comm == _mpi().COMM_NULL:
            return None
        return Communicator(comm, tuple(ranks))

    def destroy(self) -> None:
        # MPI cannot start again once finalised; mpi4py finalises at exit. Only forget the
        # world, so that a later world() builds a fresh Group.
        self._world = None

    # -- point-to-point ---------------------------------------------------------------------

    def isend(self, tensor, dst, pg, tag):
        buf = _bytes(tensor)
        return MPIWork(pg.comm.Isend(buf, dest=pg.local(dst), tag=tag), keep=(buf, tensor))

    def irecv(self, tensor, src, pg, tag):
        buf = _bytes(tensor)
        return MPIWork(pg.comm.Irecv(buf, source=pg.local(src), tag=tag), keep=(buf, tensor))

    # -- native collectives -----------------------------------------------------------------

    def _reducible(self, tensor: torch.Tensor):
        """(work tensor MPI reduces, what to run after): the tensor itself, or a float32
        copy for float16 / bfloat16 that is rounded back into ``tensor`` afterwards."""
        wide = _UPCAST.get(tensor.dtype)
        if wide is None:
            return tensor, None
        work = tensor.to(wide)
        return work, lambda: tensor.copy_(work)

    def all_reduce(self, tensor, op, pg):
        MPI = _mpi()
        work, after = self._reducible(tensor)
        buf = _view(work)
        request = pg.comm.Iallreduce(MPI.IN_PLACE, buf, op=self._op(op))
        return MPIWork(request, keep=(buf, work), after=after)

    def broadcast(self, tensor, src, pg):
        buf = _bytes(tensor)
        return MPIWork(pg.comm.Ibcast(buf, root=pg.local(src)), keep=(buf, tensor))

    def reduce(self, tensor, dst, op, pg):
        MPI = _mpi()
        root = pg.local(dst)
        work, after = self._reducible(tensor)
        buf = _view(work)
        if pg.comm.Get_rank() == root:
            request = pg.comm.Ireduce(MPI.IN_PLACE, buf, op=self._op(op), root=root)
        else:
            request, after = pg.comm.Ireduce(buf, None, op=self._op(op), root=root), None
        return MPIWork(request, keep=(buf, work), after=after)

    def all_gather(self, tensors, tensor, pg):
        stage = _stage(tensors, tensor)
        send, recv = _bytes(tensor), _bytes(stage)
        return MPIWork(pg.comm.Iallgather(send, recv), keep=(send, recv, tensor),
                       after=_unstage(stage, tensors))

    def gather(self, tensor, tensors, dst, pg):
        root = pg.local(dst)
        send = _bytes(tensor)
        if pg.comm.Get_rank() != root:
            return MPIWork(pg.comm.Igather(send, None, root=root), keep=(send, tensor))
        stage = _stage(tensors, tensor)
        recv = _bytes(stage)
        return MPIWork(pg.comm.Igather(send, recv, root=root), keep=(send, recv, tensor),
                       after=_unstage(stage, tensors))

    def scatter(self, tensor, tensors, src, pg):
        root = pg.local(src)
        recv = _bytes(tensor)
        send = None
        if pg.comm.Get_rank() == root:
            send = _bytes(torch.cat([t.reshape(-1) for t in tensors]))
        return MPIWork(pg.comm.Iscatter(send, recv, root=root), keep=(send, recv, tensor))

    def reduce_scatter(self, output, stage, op, pg):
        # stage: (p * k,) with piece i for rank i; output: (k,).
        work_in, _ = self._reducible(stage)
        work_out, after = self._reducible(output)
        send, recv = _view(work_in), _view(work_out)
        request = pg.comm.Ireduce_scatter_block(send, recv, op=self._op(op))
        return MPIWork(request, keep=(send, recv, work_in, work_out), after=after)

    def barrier(self, pg):
        return MPIWork(pg.comm.Ibarrier())

    @staticmethod
    def _op(op: ReduceOp):
        # AVG arrives as SUM (ops.wire_op); collectives.py divides once afterwards.
        MPI = _mpi()
        return {ReduceOp.SUM: MPI.SUM, ReduceOp.MAX: MPI.MAX, ReduceOp.MIN: MPI.MIN,
                ReduceOp.PRODUCT: MPI.PROD}[wire_op(op)]


MPI_ENGINE = MPIEngine()
