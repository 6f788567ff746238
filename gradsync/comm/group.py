"""Process start-up and the :class:`Group` handle every collective takes.

Start-up reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
which gradsync's own launcher sets too, or adopts a process group that the user's script already
created with ``torch.distributed.init_process_group`` (as DDP scripts do).

The engine does the joining (engine.py): with torch.distributed, rank 0 binds the rendezvous
socket itself, on MASTER_ADDR only, so the store listens nowhere else.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import env
from ..net import is_loopback
from .engine import TORCH, Engine
from .engines import start_engine
from .monitor import Monitor
from .topology import Topology, group_hosts, host_key

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class CommStats:
    """Counters a group keeps: calls made, bytes this rank sent, and bytes this rank wrote
    into shared memory (the shm algorithms: its slot, its piece of the output)."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_shm: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent, "bytes_shm": self.bytes_shm}


@dataclass(eq=False)
class Group:
    """A set of ranks that run collectives together.

    Attributes:
        pg: the engine's handle of the group.
        ranks: global ranks of the members, in group-rank order.
        rank: this process's rank inside the group.
        timeout_s: the limit for every blocking operation.
        check: when true every collective first verifies that all ranks called the same
            operation on the same shape and dtype (see ``check.py``).
    """

    pg: Any                           # the engine's handle of this group
    ranks: tuple[int, ...]
    rank: int
    timeout_s: float
    check: bool = False
    stats: CommStats = field(default_factory=CommStats)
    seq: int = 0                      # collectives started on this group
    finished_seq: int = 0             # ... and completed
    current_op: str = "-"
    op_started: float | None = None   # time.monotonic() when collective #seq started
    step: int = -1                    # the training step, for error messages and heartbeats
    monitor: Monitor | None = None    # the world group's heartbeat Monitor
    engine: Engine = TORCH            # start-up, point-to-point, native collectives
    topology: Topology | None = None  # hosts and links, for aware/hierarchical (topology.py)
    auto_choices: dict = field(default_factory=dict)  # auto's choice by size; set_topology clears
    small_plans: dict = field(default_factory=dict)   # all_reduce's compiled path: shm_fast.py
    # Own algorithms run on one thread per group, so that async calls keep their issue
    # order on every rank; point-to-point messages then always pair up.
    _executor: ThreadPoolExecutor | None = None
    _pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradsync-comm")
        return self._executor

    def where(self) -> str:
        """' at step N' when a trainer has said which step it is in."""
        return f" at step {self.step}" if self.step >= 0 else ""

    def shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# The engine that starts the world, chosen from the table (engines.py) by
# init_process_group, or given by join_store.
_ENGINE: Engine = TORCH

# The default group mirrors the engine's own global default group: one per process.
_world: dict[int, Group] = {}


def _env_int(name: str, given: int | None) -> int:
    if given is not None:
        return given
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"{name} is not set: run under torchrun or `gradsync train`, "
                           f"or pass {name.lower()}= to init_process_group")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer") from None


def init_process_group(backend: str | None = None, *, rank: int | None = None,
                       world_size: int | None = None, master_addr: str | None = None,
                       master_port: int | None = None, timeout_s: float | None = None,
                       check: bool | None = None) -> Group:
    """Join (or adopt) the default process group and return its :class:`Group`.

    Args:
        backend: engine; default gloo for CPU tensors plus NCCL for CUDA tensors when present.
        rank, world_size, master_addr, master_port: default to torchrun's environment.
        timeout_s: limit for every blocking operation (default ``GRADSYNC_TIMEOUT`` or 300 s).
        check: verify every collective across ranks (default ``GRADSYNC_CHECK=1``).

    Raises:
        RuntimeError: the environment is incomplete or the rendezvous port cannot be bound.
        ValueError: a GRADSYNC_* variable is not valid (``gradsync/env.py`` names it).
    """
    global _ENGINE
    if not _ENGINE.is_initialized():
        _ENGINE = start_engine()
    timeout_s, check = _defaults(timeout_s, check)
    if _ENGINE.is_initialized():
        log.info("adopting the process group created by the script")
        group = world()
        group.check = group.check or check
        _start_monitor(group, _ENGINE.adopt())
        _detect_hosts(group)
        return group
    rank = _env_int("RANK", rank)
    world_size = _env_int("WORLD_SIZE", world_size)
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = _env_int("MASTER_PORT", master_port)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if is_loopback(master_addr):
        # Gloo otherwise binds the address the host name resolves to; on one machine the
        # peers only need loopback, and nothing should listen beyond it.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = _ENGINE.rendezvous(master_addr, master_port, rank, world_size, timeout_s, backend)
    group = world()
    group.timeout_s = timeout_s
    group.check = check
    _start_monitor(group, store)
    _detect_hosts(group)
    return group


def _detect_hosts(group: Group) -> None:
    """Learn which ranks share a host, so that ``auto`` takes shared memory in any script
    whose ranks share a machine, not only under DataParallel, which probes the links too."""
    if group.topology is not None or group.size == 1:
        return
    group.topology = gather_hosts(group)
    group.auto_choices.clear()


def gather_hosts(group: Group) -> Topology:
    """Which ranks of ``group`` share a host: one all-gather of each rank's host key (no
    rates; collective). Raises the engine's RuntimeError."""
    key = torch.tensor([host_key()], dtype=torch.int64)
    keys = [torch.empty_like(key) for _ in range(group.size)]
    group.engine.all_gather(keys, key, group.pg).wait()
    return group_hosts([int(k) for k in keys])


def join_store(store, rank: int, world_size: int, *, prefix: str = "",
               timeout_s: float | None = None, backend: str | None = None,
               engine: Engine = TORCH) -> Group:
    """Join a world whose rendezvous keys live under ``prefix`` in ``store``, a store the
    caller holds (elastic.py: one that the launcher serves, one prefix per generation).

    Args:
        store: from ``engine.connect_store`` (or ``serve_store``).
        rank, world_size: this process's place in the new world.
        timeout_s, backend: as :func:`init_process_group`.
        engine: the engine the store belongs to.
    Returns:
        The world's :class:`Group` (no heartbeats: the caller owns the store's keys).
    """
    global _ENGINE
    timeout_s, _ = _defaults(timeout_s, False)
    _ENGINE = engine
    engine.join(store, prefix, rank, world_size, timeout_s, backend)
    group = world()
    group.timeout_s = timeout_s
    return group


def _defaults(timeout_s: float | None, check: bool | None) -> tuple[float, bool]:
    if timeout_s is None:
        timeout_s = env.timeout_s(DEFAULT_TIMEOUT_S)
    if check is None:
        check = env.check()
    return timeout_s, check


def _start_monitor(group: Group, store) -> None:
    if store is None or group.size == 1 or group.monitor is not None:
        return
    interval = env.heartbeat_s(1.0)
    stall = env.stall_s(max(5.0, group.timeout_s / 4))
    group.monitor = Monitor(store, group, interval, stall).start()


@atexit.register
def _shutdown_threads() -> None:
    # Stop our threads while the interpreter is whole. A daemon thread still inside a store
    # call at finalization is unwound by the interpreter, which aborts the process
    # ("terminate called without an active exception", SIGABRT), e.g. in a script that ends
    # with dist.destroy_process_group() rather than ours.
    for group in list(_world.values()):
        group.shutdown()


def world() -> Group:
    """The :class:`Group` of all processes (the engine's default group)."""
    if not _ENGINE.is_initialized():
        raise RuntimeError("no process group: call gradsync.comm.init_process_group() first")
    pg, rank, size = _ENGINE.world()
    group = _world.get(id(pg))
    if group is None:
        timeout = env.timeout_s(DEFAULT_TIMEOUT_S)
        group = Group(pg=pg, ranks=tuple(range(size)), rank=rank, timeout_s=timeout,
                      engine=_ENGINE)
        _world.clear()
        _world[id(pg)] = group
    return group


def last_world() -> Group | None:
    """The world's Group as :func:`world` last found it, without asking the engine (a few us
    under MPI): for algorithms/shm_fast.py, whose plans were made through world()."""
    return next(iter(_world.values()), None)


def new_group(ranks: list[int], *, timeout_s: float | None = None,
              check: bool | None = None) -> Group | None:
    """Create a sub-group. Every process of the world must call this with the same ranks.

    Returns:
        The group, or None in processes that are not members.
    """
    parent = world()
    ranks = sorted(set(ranks))
    if not ranks or ranks[0] < 0 or ranks[-1] >= parent.size:
        raise ValueError(f"ranks {ranks} are not a subset of 0..{parent.size - 1}")
    timeout_s = parent.timeout_s if timeout_s is None else timeout_s
    pg = parent.engine.new_group(ranks, timeout_s)
    if parent.rank not in ranks:
        return None
    hosts = None
    if parent.topology is not None:  # the members' hosts, as the world found them (no rates)
        hosts = group_hosts([parent.topology.host_of(r) for r in ranks])
    return Group(pg=pg, ranks=tuple(ranks), rank=ranks.index(parent.rank), timeout_s=timeout_s,
                 check=parent.check if check is None else check, engine=parent.engine,
                 topology=hosts)


def resolve(group: Group | None) -> Group:
    return world() if group is None else group


def is_initialized() -> bool:
    return _ENGINE.is_initialized()


def get_rank(group: Group | None = None) -> int:
    return resolve(group).rank


def get_world_size(group: Group | None = None) -> int:
    return resolve(group).size


def destroy_process_group() -> None:
    """Tear down the default group and its comm thread (idempotent)."""
    for group in list(_world.values()):
        group.shutdown()
    _world.clear()
    _ENGINE.destroy()


def set_step(step: int, group: Group | None = None) -> None:
    """Tell the communication layer which training step runs, for errors and heartbeats."""
    resolve(group).step = step
