"""Start and supervise the worker processes of one machine (a tiny, single-node torchrun).

    result = launch(["train", "--epochs=1"], nprocs=4)  # 4 x `python -m gradsync train ...`

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
GRADSYNC_LAUNCHED=1. When a worker fails the launcher names the rank that caused it, gives the
others a grace period, then stops them; no worker or grandchild outlives ``launch``. This
module sets up the workers; :func:`gradsync.launcher.supervise.run_processes` supervises them.
Linux only. No torch import: the launcher must start fast, and only
``gradsync.comm`` talks to torch.distributed.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

from ..net import bind_listener, is_loopback
from .supervise import LaunchResult, run_processes

__all__ = ["LaunchError", "LaunchResult", "check_port_free", "find_free_port", "launch",
           "rank_env", "worker_env"]

logger = logging.getLogger(__name__)


class LaunchError(Exception):
    """A problem the user can fix (bad nprocs, port in use); the message is one line."""


def find_free_port(addr: str = "127.0.0.1") -> int:
    """Ask the kernel for a TCP port that is free on ``addr`` right now.

    Another process may still take it before the rendezvous store binds it (an inherent
    race); pass an explicit port where that matters.

    Args:
        addr: the address the rendezvous store will listen on.

    Returns:
        A free port number.

    Raises:
        LaunchError: if ``addr`` cannot be bound (not an address of this machine).
    """
    try:
        with bind_listener(addr, 0) as sock:
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise LaunchError(f"cannot bind a port on {addr}: {exc.strerror}") from exc


def check_port_free(addr: str, port: int, flag: str = "--port") -> None:
    """Fail early, with a clear message, if ``port`` is taken on ``addr``.

    Args:
        addr: the master address.
        port: the master port.
        flag: the flag that chooses the port, named in the message.

    Raises:
        LaunchError: if the port is out of range, in use, or ``addr`` cannot be bound.
    """
    if not 1 <= port <= 65535:
        raise LaunchError(f"port {port} is out of range; choose one in 1-65535 with {flag}")
    try:
        bind_listener(addr, port).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LaunchError(
                f"port {port} on {addr} is already in use; choose another with {flag}"
            ) from exc
        raise LaunchError(f"cannot bind {addr}:{port}: {exc.strerror}") from exc


def rank_env(ranks_here: int) -> dict[str, str]:
    """What every launcher gives the ranks that share this machine, unless the user set it:
    OMP_NUM_THREADS so that they share its cores instead of each starting one thread per
    core, and TORCH_CPP_LOG_LEVEL=ERROR: c10d's warnings (with C++ stack traces) when a
    peer's store connection breaks repeat gradsync's one-line errors, which name the rank
    (it also hides c10d's warning that lab addresses have no reverse DNS entry)."""
    threads = str(max(1, (os.cpu_count() or 1) // ranks_here))
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}


def worker_env(rank: int, world_size: int, addr: str, port: int,
               extra: dict[str, str] | None = None, *, local_rank: int | None = None,
               local_world_size: int | None = None, node_rank: int = 0, nnodes: int = 1,
               restart: int = 0, max_restarts: int = 0) -> dict[str, str]:
    """The environment of rank ``rank``: ``os.environ``, ``extra``, then what torchrun sets.

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK / GROUP_WORLD_SIZE (the
    node), ROLE_* (one role, "default"), MASTER_ADDR / MASTER_PORT, TORCHELASTIC_RESTART_COUNT
    / _MAX_RESTARTS / _RUN_ID, so that a script written for torchrun runs unchanged; and
    GRADSYNC_LAUNCHED=1. One node unless told: the local rank is the rank.
    """
    env = {**os.environ, **(extra or {})}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank if local_rank is None else local_rank),
        LOCAL_WORLD_SIZE=str(world_size if local_world_size is None else local_world_size),
        GROUP_RANK=str(node_rank), GROUP_WORLD_SIZE=str(nnodes),
        ROLE_NAME="default", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world_size),
        MASTER_ADDR=addr, MASTER_PORT=str(port),
        TORCHELASTIC_RESTART_COUNT=str(restart), TORCHELASTIC_MAX_RESTARTS=str(max_restarts),
        TORCHELASTIC_RUN_ID="none",  # torchrun's value for a static rendezvous
        GRADSYNC_LAUNCHED="1",
    )
    # Without this gloo binds the interface its host name resolves to, which exposes the
    # workers' sockets on the network even though the job is purely local.
    if is_loopback(addr) and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


_worker_env = worker_env  # (the elastic launcher's name for it)


def launch(
    argv: list[str],
    nprocs: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    env: dict[str, str] | None = None,
    grace_s: float = 5.0,
    module: str = "gradsync",
    tolerate: frozenset[int] = frozenset(),
    restart: int = 0,
    max_restarts: int = 0,
) -> LaunchResult:
    """Run ``python -m module *argv`` in ``nprocs`` worker processes and supervise them.

    Workers inherit stdout/stderr and run in their own process groups; each dies with the
    launcher (PR_SET_PDEATHSIG). They are forked from one process that imported ``module``
    (and torch, for gradsync's own ranks) instead of each importing it again: zygote.py;
    GRADSYNC_ZYGOTE=0 in ``env`` or the environment starts each as a fresh interpreter.
    When a worker fails, the others get ``grace_s`` seconds
    to exit on their own, then SIGTERM, then SIGKILL. SIGINT / SIGTERM sent to the launcher
    are forwarded to the workers. Every worker process group is killed before returning.

    Args:
        argv: arguments after ``python -m module``.
        nprocs: number of workers (the world size on this machine).
        master_addr: rendezvous address; a loopback address also sets GLOO_SOCKET_IFNAME=lo
            unless it is already set.
        master_port: rendezvous port; None picks a free one.
        env: extra environment variables for the workers (the rendezvous ones win).
        grace_s: seconds the surviving workers get to exit after the first failure.
        module: the module the workers run.
        tolerate: ranks whose failure is reported but does not stop the others (the
            workers of an asynchronous parameter server, which the servers drop).
        restart, max_restarts: this start's number and the caller's limit, given to the
            workers as torchrun does (TORCHELASTIC_RESTART_COUNT / _MAX_RESTARTS).

    Returns:
        A LaunchResult naming the root-cause rank and reason when a worker failed.

    Raises:
        LaunchError: for a bad ``nprocs`` or an unusable address / port.
    """
    if nprocs < 1:
        raise LaunchError(f"nprocs must be at least 1, got {nprocs}")
    if master_port is None:
        master_port = find_free_port(master_addr)
    else:
        check_port_free(master_addr, master_port)
    logger.info(
        "launching %d workers of `python -m %s` on %s:%d", nprocs, module, master_addr, master_port
    )
    cmd = [sys.executable, "-m", module, *argv]
    envs = [worker_env(rank, nprocs, master_addr, master_port, env, restart=restart,
                       max_restarts=max_restarts) for rank in range(nprocs)]
    return run_processes([cmd] * nprocs, envs, grace_s=grace_s, tolerate=frozenset(tolerate),
                         fork=True)
