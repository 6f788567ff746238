"""Where an engine plugs in: start-up, point-to-point transfers and native collectives.

Everything above this module (groups, gradsync's own algorithms, check mode, the heartbeats,
the collectives' error translation, elastic generations) reaches an engine only through the
three parts of :class:`Engine`. An engine is:

- **start-up**: join the world from a rendezvous address (or adopt a world the user's
  script created), or from a key-value store the caller serves, connects to or opens in a
  file (elastic worlds, one key prefix per generation); make sub-groups, tear down;
- **point-to-point**: ``isend`` / ``irecv`` of a tensor to a global rank, returning a handle
  with ``wait()`` and ``is_completed()`` (the substrate of gradsync's own algorithms and of
  the Parameter Server);
- **native collectives**: the engine's own all-reduce, broadcast, ... each started
  asynchronously and returning such a handle.

Ranks here are global; handles of groups (``pg``) are the engine's own. Two engines exist:
torch.distributed (Gloo for CPU tensors, NCCL for CUDA ones), :data:`TORCH` in this module,
and MPI (mpi.py, mpi4py imported through mpi_launcher.py); apart from reference.py's DDP
baseline, no other module calls an engine's library. engines.py is the one table of them,
from which start-up chooses (``--engine`` / ``GRADSYNC_ENGINE``, or the launcher). A new
engine is a new module implementing :class:`Engine` plus one line there.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..net import listen_fd
from .ops import ReduceOp, wire_op

Handle = Any  # the engine's request object: wait(), is_completed()


class Engine(Protocol):
    name: str

    # -- start-up ---------------------------------------------------------------------------
    def rendezvous(self, addr: str, port: int, rank: int, world_size: int,
                   timeout_s: float, backend: str | None) -> Any: ...
    def adopt(self) -> Any: ...
    def serve_store(self, addr: str, port: int, timeout_s: float,
                    world_size: int | None = None) -> Any: ...
    def connect_store(self, addr: str, port: int, timeout_s: float,
                      world_size: int | None = None) -> Any: ...
    def open_store(self, path: str, timeout_s: float) -> Any: ...
    def join(self, store: Any, prefix: str, rank: int, world_size: int, timeout_s: float,
             backend: str | None) -> None: ...
    def is_initialized(self) -> bool: ...
    def world(self) -> tuple[Any, int, int]: ...
    def new_group(self, ranks: list[int], timeout_s: float) -> Any: ...
    def destroy(self) -> None: ...

    # -- point-to-point ---------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, dst: int, pg: Any, tag: int) -> Handle: ...
    def irecv(self, tensor: torch.Tensor, src: int, pg: Any, tag: int) -> Handle: ...

    # -- native collectives (asynchronous) --------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp, pg: Any) -> Handle: ...
    def broadcast(self, tensor: torch.Tensor, src: int, pg: Any) -> Handle: ...
    def reduce(self, tensor: torch.Tensor, dst: int, op: ReduceOp, pg: Any) -> Handle: ...
    def all_gather(self, tensors: list[torch.Tensor], tensor: torch.Tensor, pg: Any
                   ) -> Handle: ...
    def gather(self, tensor: torch.Tensor, tensors: list[torch.Tensor] | None, dst: int,
               pg: Any) -> Handle: ...
    def scatter(self, tensor: torch.Tensor, tensors: list[torch.Tensor] | None, src: int,
                pg: Any) -> Handle: ...
    def reduce_scatter(self, output: torch.Tensor, stage: torch.Tensor, op: ReduceOp,
                       pg: Any) -> Handle: ...
    def barrier(self, pg: Any) -> Handle: ...


# AVG arrives as SUM (ops.wire_op): the division happens once, in ops.finish_.
_OPS = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.MAX: dist.ReduceOp.MAX,
        ReduceOp.MIN: dist.ReduceOp.MIN, ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT}

# torch 2.13 renamed reduce_scatter_tensor (now deprecated); older releases lack the new name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchDistributed:
    """torch.distributed: Gloo for CPU tensors, NCCL for CUDA tensors when present."""

    name = "torch.distributed"

    # -- start-up ---------------------------------------------------------------------------

    def rendezvous(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                   backend: str | None):
        """Join the world through a TCPStore on ``addr:port`` (rank 0 serves it); returns
        the store. Under torchrun's agent the store already exists on that port."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend or _default_backend(), init_method="env://",
                                    rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            return self.adopt()
        if rank == 0:
            store = self.serve_store(addr, port, timeout_s, world_size)
        else:
            store = self.connect_store(addr, port, timeout_s, world_size)
        self.join(store, "", rank, world_size, timeout_s, backend)
        return store

    def serve_store(self, addr: str, port: int, timeout_s: float,
                    world_size: int | None = None):
        """A TCPStore served by this process on ``addr:port`` only (``port`` 0: a free one,
        the store's ``port`` tells which); ``world_size`` None: any number of clients.

        This process binds the socket itself and hands it to the store: the store then
        listens where it was told rather than on every interface, and a port in use is
        reported as such instead of as a rendezvous timeout.
        """
        fd, port = listen_fd(addr, port)  # the store takes it over and closes it with itself
        try:
            return dist.TCPStore(addr, port, world_size, True,
                                 timeout=datetime.timedelta(seconds=timeout_s),
                                 master_listen_fd=fd, use_libuv=True, wait_for_workers=False)
        except BaseException:
            os.close(fd)
            raise

    def connect_store(self, addr: str, port: int, timeout_s: float,
                      world_size: int | None = None):
        """A client of the TCPStore served on ``addr:port``."""
        return dist.TCPStore(addr, port, world_size, False,
                             timeout=datetime.timedelta(seconds=timeout_s))

    def open_store(self, path: str, timeout_s: float):
        """A store kept in the file ``path``, shared by the processes of this machine that
        can open it: unlike a TCPStore, which any local process may connect to (and list
        every key of), the file's permissions decide who reaches it."""
        store = dist.FileStore(path, -1)  # -1: the caller removes the file
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        return store

    def join(self, store, prefix: str, rank: int, world_size: int, timeout_s: float,
             backend: str | None) -> None:
        """Join the world whose rendezvous keys live under ``prefix`` in ``store``."""
        if prefix:
            store = dist.PrefixStore(prefix, store)
        dist.init_process_group(backend or _default_backend(), store=store, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))

    def adopt(self):
        """The store of a world that already exists (no public accessor exists)."""
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - the store only feeds optional diagnostics
            return None

    def is_initialized(self) -> bool:
        return dist.is_initialized()

    _known: tuple = (None, 0, 0)     # the last world seen: (pg, rank, size)

    def world(self):
        # Every call with group=None asks this; torch's get_rank / get_world_size cost a few
        # us each, so they are asked again only when the default group is another one.
        pg = dist.group.WORLD
        if pg is not self._known[0]:
            self._known = (pg, dist.get_rank(), dist.get_world_size())
        return self._known

    def new_group(self, ranks: list[int], timeout_s: float):
        return dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- point-to-point ---------------------------------------------------------------------

    def isend(self, tensor, dst, pg, tag):
        return dist.isend(tensor, dst, group=pg, tag=tag)

    def irecv(self, tensor, src, pg, tag):
        return dist.irecv(tensor, src, group=pg, tag=tag)

    # -- native collectives -----------------------------------------------------------------

    def all_reduce(self, tensor, op, pg):
        return dist.all_reduce(tensor, op=_OPS[wire_op(op)], group=pg, async_op=True)

    def broadcast(self, tensor, src, pg):
        return dist.broadcast(tensor, src, group=pg, async_op=True)

    def reduce(self, tensor, dst, op, pg):
        return dist.reduce(tensor, dst, op=_OPS[wire_op(op)], group=pg, async_op=True)

    def all_gather(self, tensors, tensor, pg):
        return dist.all_gather(tensors, tensor, group=pg, async_op=True)

    def gather(self, tensor, tensors, dst, pg):
        return dist.gather(tensor, tensors, dst, group=pg, async_op=True)

    def scatter(self, tensor, tensors, src, pg):
        return dist.scatter(tensor, tensors, src, group=pg, async_op=True)

    def reduce_scatter(self, output, stage, op, pg):
        return _reduce_scatter(output, stage, op=_OPS[wire_op(op)], group=pg, async_op=True)

    def barrier(self, pg):
        return dist.barrier(group=pg, async_op=True)


TORCH = TorchDistributed()


def _default_backend() -> str:
    # gloo carries CPU tensors, NCCL CUDA tensors; one group can hold both.
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"
