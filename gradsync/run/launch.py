"""`gradsync run`: start a user's script (or module) on several processes, as torchrun does,
and supervise them as `gradsync train` does.

    gradsync run --nproc-per-node 4 train.py --epochs 3            # 4 ranks here
    gradsync run --nnodes 2 --node-rank 0 --master-addr H0 --master-port 29500 \\
        --nproc-per-node 2 train.py                                 # ... and the same on H1
    gradsync run --lab 3 --rate 200mbit train.py                    # 3 emulated hosts
    gradsync run --elastic --nproc-per-node 4 --min-workers 2 --max-restarts 1 train.py

Each rank gets torchrun's environment (:func:`gradsync.launcher.worker_env`). A failed rank
is named, the others get a grace period and are stopped, no process is left, and the exit
status is the failed rank's (128 + signal when killed; 124 after --timeout; 130 on Ctrl-C).
``--max-restarts R`` without --elastic restarts the whole group up to R times, as torchrun
does (TORCHELASTIC_RESTART_COUNT counts them); with --elastic only the lost worker is
replaced and the others go on (gradsync.train.elastic_run hosts the store). No torch import
here except for --elastic.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from ..exits import EXIT_INTERRUPTED, UserError, say
from ..launcher import EXIT_TIMEOUT, LaunchError, LaunchResult, run_processes
from ..launcher.launch import check_port_free, find_free_port, rank_env, worker_env
from .config import RunConfig
from .logs import RankLogs

log = logging.getLogger(__name__)

DEFAULT_MULTINODE_PORT = 29500  # torchrun's default MASTER_PORT
_FINAL = {0, EXIT_TIMEOUT, EXIT_INTERRUPTED, 128 + 15}  # no restart after these


def command_of(script: str, args: list[str], *, module: bool = False,
               no_python: bool = False) -> list[str]:
    """What each rank runs: ``python script args``, ``python -m module args``, or, with
    ``no_python``, ``script args`` itself (torchrun's -m and --no-python)."""
    if module and no_python:
        raise UserError("-m and --no-python cannot be combined: a module needs Python")
    if no_python:
        return [script, *args]
    if module:
        return [sys.executable, "-m", script, *args]
    if not os.path.isfile(script):
        raise UserError(f"no script {script}: pass a Python file, or -m MODULE")
    return [sys.executable, script, *args]


def run(config: RunConfig, cmd: list[str]) -> int:
    """Run ``cmd`` as ``config`` says and return the run's exit status."""
    # A lab's hosts all share this machine's cores: every rank of it counts.
    extra = {**rank_env(len(_ranks_here(config))),
             "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
    if config.timeline is None:
        return _run(config, cmd, extra)
    path = os.path.abspath(config.timeline)
    extra["GRADSYNC_TIMELINE"] = path  # gradsync/run/timeline.py, in each rank
    try:
        return _run(config, cmd, extra)
    finally:
        from .timeline import merge_here

        merge_here(path, len(_ranks_here(config)) if config.elastic.elastic else
                   config.world_size)


def _run(config: RunConfig, cmd: list[str], extra: dict[str, str]) -> int:
    if config.elastic.elastic:
        return _run_elastic(config, cmd, extra)
    logs = None
    if config.log_dir is not None:
        try:
            logs = RankLogs(config.log_dir, _ranks_here(config), config.redirects, config.tee)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    try:
        if config.lab.hosts is not None:
            return _run_in_lab(config, cmd, extra, logs)
        return _restarts(config, logs, lambda restart: _run_here(config, cmd, extra, logs,
                                                                  restart))
    finally:
        if logs is not None:
            logs.close()


def _ranks_here(config: RunConfig) -> list[int]:
    """The global ranks this launcher starts, in its order."""
    if config.lab.hosts is not None:
        return list(range(config.world_size))
    first = config.node_rank * config.nproc_per_node
    return list(range(first, first + config.nproc_per_node))


def _restarts(config: RunConfig, logs: RankLogs | None,
              attempt: Callable[[int], LaunchResult]) -> int:
    """Run ``attempt(restart)`` until it succeeds, is stopped, or the restarts are spent."""
    restart = 0
    while True:
        result = attempt(restart)
        if result.returncode in _FINAL or restart == config.max_restarts:
            return _report(result)
        restart += 1
        say(f"gradsync: restarting every worker (restart {restart} of "
            f"{config.max_restarts})")
        if logs is not None:
            logs.restarted(restart)


def _report(result: LaunchResult) -> int:
    """Say how the run ended, in one line, unless it went well."""
    code = result.returncode
    if code == EXIT_INTERRUPTED:
        say("gradsync: interrupted")
    elif code and result.failed_rank is not None:
        say(f"gradsync: run failed: worker rank {result.failed_rank} {result.reason}")
    return code


def _master_port(config: RunConfig) -> int:
    """Node 0's store port: the one asked for (checked free on node 0), else a free one on
    one node, else torchrun's 29500 (every node must know it)."""
    addr = config.master_addr
    try:
        if config.master_port is None:
            if config.nnodes > 1:
                port = DEFAULT_MULTINODE_PORT
            else:
                return find_free_port(addr)
        else:
            port = config.master_port
        if config.node_rank == 0:
            check_port_free(addr, port, flag="--master-port")
        return port
    except LaunchError as exc:
        raise UserError(str(exc)) from None


def _run_here(config: RunConfig, cmd: list[str], extra: dict[str, str],
              logs: RankLogs | None, restart: int) -> LaunchResult:
    """One attempt of this node's ranks."""
    port = _master_port(config)
    n, node = config.nproc_per_node, config.node_rank
    envs = [worker_env(node * n + local, config.world_size, config.master_addr, port, extra,
                       local_rank=local, local_world_size=n, node_rank=node,
                       nnodes=config.nnodes, restart=restart,
                       max_restarts=config.max_restarts) for local in range(n)]
    log.info("starting %d ranks of %s (node %d of %d, store %s:%d)", n, cmd, node,
             config.nnodes, config.master_addr, port)
    try:
        return run_processes([cmd] * n, envs, timeout_s=config.timeout,
                             on_line=None if logs is None else logs.on_line)
    except OSError as exc:  # the program cannot be started (--no-python with a bad path)
        raise UserError(f"cannot start {cmd[0]}: {exc.strerror or exc}") from None


def _run_in_lab(config: RunConfig, cmd: list[str], extra: dict[str, str],
                logs: RankLogs | None) -> int:
    """--lab N: bring the emulated cluster up, run every rank in its host, take it down."""
    from ..lab import LabError, up
    from ..lab.run import run_ranks

    lab_config = config.lab
    rates = lab_config.rates.split(",") if lab_config.rates else None
    port = config.master_port or DEFAULT_MULTINODE_PORT
    on_line = None if logs is None else logs.on_line
    try:
        with up(lab_config.hosts, lab_config.rate, rates, config.procs_per_host) as lab:
            return _restarts(config, logs, lambda restart: run_ranks(
                lab, cmd, extra, master_port=port, timeout_s=config.timeout,
                on_line=on_line, restart=restart))
    except LabError as exc:
        raise UserError(str(exc)) from None


def _run_elastic(config: RunConfig, cmd: list[str], extra: dict[str, str]) -> int:
    """--elastic: the store and the coordinator live here; the script joins through
    gradsync.elastic (GRADSYNC_ELASTIC_STORE, GRADSYNC_ELASTIC_UID)."""
    from .. import env as gradsync_env
    from ..train.elastic_run import launch as launch_elastic
    from ..train.elastic_run import launch_agent

    if config.elastic.rdzv_endpoint is not None:
        from ..net import parse_endpoint

        host, port = parse_endpoint(config.elastic.rdzv_endpoint, "--rdzv-endpoint")
        return launch_agent(cmd, host, port, config.nproc_per_node,
                            max_restarts=config.max_restarts,
                            timeout_s=gradsync_env.timeout_s(300.0), env=extra)
    return launch_elastic(cmd, config.nproc_per_node,
                          min_workers=config.elastic.min_workers or 1,
                          max_restarts=config.max_restarts, addr=config.master_addr,
                          timeout_s=gradsync_env.timeout_s(300.0), env=extra)
