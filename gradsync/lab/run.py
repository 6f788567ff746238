"""Run a command once per process slot of a lab, inside the hosts' namespaces.

    rc = lab_launch(lab, ["train", "--arch", "allreduce"])    # python -m gradsync train ...
    rc = run_command(lab, ["python", "-m", "gradsync", "bench", "collectives"])

Rank r runs on host r // procs_per_host through ``ip netns exec``, with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (host 0's lab address), MASTER_PORT and
GLOO_SOCKET_IFNAME (the host's lab interface) set. Output is streamed line by line as
``[rank N] ...``. Supervision is :func:`gradsync.launcher.run_processes`, as for
gradsync.launcher.launch: when a rank fails the others get a grace period, then SIGTERM, then SIGKILL;
each rank has its own process group and dies with the launcher (PR_SET_PDEATHSIG); every
group is killed before returning.
"""

from __future__ import annotations

import sys
import threading

from ..launcher import EXIT_TIMEOUT, LaunchResult, OnLine, run_processes
from ..launcher.launch import rank_env, worker_env
from .cluster import Lab, up
from .netns import LabError

__all__ = ["EXIT_TIMEOUT", "OnLine", "lab_launch", "run_command", "run_ranks", "slot_env",
           "train_in_lab"]

_print_lock = threading.Lock()


def _print_line(rank: int, stream: str, line: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    with _print_lock:
        out.write(f"[rank {rank}] {line}\n")
        out.flush()


def slot_env(lab: Lab, rank: int, master_port: int,
             extra: dict[str, str] | None = None, restart: int = 0) -> dict[str, str]:
    """The environment of process slot ``rank``: ``os.environ``, ``extra``, then torchrun's
    variables (a host is a node) and the lab's."""
    per_host = lab.procs_per_host
    extra = dict(extra or {})
    # Every host's ranks share this one machine's cores.
    extra.setdefault("OMP_NUM_THREADS", rank_env(lab.world_size)["OMP_NUM_THREADS"])
    extra.setdefault("PYTHONUNBUFFERED", "1")  # lines appear as they are printed
    env = worker_env(rank, lab.world_size, lab.master_addr, master_port, extra,
                     local_rank=rank % per_host, local_world_size=per_host,
                     node_rank=rank // per_host, nnodes=len(lab.hosts), restart=restart)
    env.update(GLOO_SOCKET_IFNAME=lab.hosts[rank // per_host].ifname, GRADSYNC_LAB=lab.name)
    return env


def run_command(lab: Lab, command: list[str], env: dict[str, str] | None = None, *,
                master_port: int = 29500, timeout_s: float | None = None,
                grace_s: float = 5.0, on_line: OnLine | None = None) -> int:
    """Run ``command`` once per process slot of ``lab``; the run's exit status (see
    :func:`run_ranks`)."""
    return run_ranks(lab, command, env, master_port=master_port, timeout_s=timeout_s,
                     grace_s=grace_s, on_line=on_line).returncode


def run_ranks(lab: Lab, command: list[str], env: dict[str, str] | None = None, *,
              master_port: int = 29500, timeout_s: float | None = None,
              grace_s: float = 5.0, on_line: OnLine | None = None,
              restart: int = 0) -> LaunchResult:
    """Run ``command`` once per process slot of ``lab`` and supervise the ranks.

    Args:
        lab: a lab that is up.
        command: the program and its arguments, run inside each host's namespace.
        env: extra environment variables (the lab's rendezvous variables win).
        master_port: rendezvous port on host 0.
        timeout_s: stop every rank after this many seconds and return 124.
        grace_s: after a rank fails, seconds the others get to exit on their own.
        on_line: called for each output line; default prints ``[rank N] line``.
        restart: how many times the group was restarted (TORCHELASTIC_RESTART_COUNT).

    Returns:
        The supervisor's result: return code 0 if every rank exited 0; else the failing
        rank's code (128 + signal if killed), 124 on timeout, 130 / 143 if this process got
        SIGINT / SIGTERM; the failing rank and why.

    Raises:
        LabError: empty command or a bad port.
    """
    if not command:
        raise LabError("no command to run; put it after `--`")
    if not 1 <= master_port <= 65535:
        raise LabError(f"port {master_port} is out of range 1-65535")
    cmds = [lab.exec_argv(rank // lab.procs_per_host, command) for rank in range(lab.world_size)]
    envs = [slot_env(lab, rank, master_port, env, restart) for rank in range(lab.world_size)]
    return run_processes(cmds, envs, grace_s=grace_s, timeout_s=timeout_s,
                         on_line=on_line or _print_line)


def lab_launch(lab: Lab, argv: list[str], *, module: str = "gradsync",
               env: dict[str, str] | None = None, master_port: int = 29500,
               timeout_s: float | None = None, on_line: OnLine | None = None) -> int:
    """Run ``python -m module *argv`` once per process slot of ``lab``; see :func:`run_command`.

    Returns:
        0 if every rank succeeded, else non-zero (the failing rank's exit code).
    """
    return run_command(lab, [sys.executable, "-m", module, *argv], env,
                       master_port=master_port, timeout_s=timeout_s, on_line=on_line)


def train_in_lab(hosts: int, rate: str, rates: list[str] | None, argv: list[str],
                 env: dict[str, str] | None = None, *, procs_per_host: int = 1,
                 master_port: int = 29500) -> int:
    """``gradsync train --lab N --rate R``: bring a lab up, train across it, take it down.

    Args:
        hosts, rate, rates, procs_per_host: as :func:`~gradsync.lab.cluster.up`.
        argv: arguments of ``gradsync train`` for every rank.
        env: extra environment variables for the ranks.

    Returns:
        The run's exit status (see :func:`run_command`).

    Raises:
        LabError: the lab cannot be created (nothing is left behind).
    """
    with up(hosts, rate, rates, procs_per_host) as lab:  # down on any exit, Ctrl-C included
        return lab_launch(lab, ["train", *argv], env=env, master_port=master_port)
