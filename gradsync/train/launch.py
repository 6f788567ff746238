"""The launcher side of `gradsync train`: start the ranks on this machine (or one per host of
an emulated cluster) and supervise them.

    gradsync train --workers 4          # four local ranks, each runs gradsync.train.worker
    gradsync train --lab 3 --rate 1gbit # one rank per emulated host (--procs-per-host P: P)
    gradsync train --elastic ...        # the rendezvous store lives here (elastic_run.py)
    gradsync train --arch auto ...      # plan first, here, then run the best (auto.py)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..exits import EXIT_INTERRUPTED, SELF_EXPLAINED, UserError, say
from ..flags import to_argv
from ..launcher.launch import rank_env
from .architecture import AUTO
from .config import TrainConfig
from .worker import check_writable


def _tolerated(config: TrainConfig) -> frozenset[int]:
    """The ranks whose loss the run survives (the PS's workers, when its servers drop them)."""
    if config.arch != "ps":
        return frozenset()
    from ..ps.placement import local_server_ranks, tolerated_ranks

    try:
        servers = local_server_ranks(config.ps.servers, config.ps.server_ranks,
                                     config.processes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.launch.elastic and not config.launch.drops_lost:
        return frozenset()  # every loss restarts the run (_supervise)
    return tolerated_ranks(servers, config.processes, config.ps.consistency,
                           config.launch.elastic)


def run_local(config: TrainConfig, interrupts_raise=lambda: None) -> int:
    """Start the run's processes, supervise them, and return the run's exit code.
    ``interrupts_raise`` is called once the launcher forwards Ctrl-C to its ranks."""
    if config.output.out:
        check_writable(config.output.out)
    if config.checkpoint.dir and Path(config.checkpoint.dir).exists() \
            and not Path(config.checkpoint.dir).is_dir():
        raise UserError(f"--checkpoint-dir {config.checkpoint.dir} is a file, not a directory")
    if config.arch == AUTO:  # plan here, once; the ranks get the chosen flags
        from .auto import record, resolve

        config, choice = resolve(config)
        code = run_local(config, interrupts_raise)
        if code == 0:
            record(config.output.out, choice)
        return code
    if config.lab.hosts:
        return run_in_lab(config, interrupts_raise)
    env = rank_env(config.launch.workers)
    tolerate = _tolerated(config)
    interrupts_raise()
    if config.launch.elastic and config.arch != "ps":  # the rendezvous store lives here
        from .elastic_run import run_local as run_elastic

        return run_elastic(config, env)
    return _supervise(config, env, tolerate)


def _supervise(config: TrainConfig, env: dict[str, str], tolerate: frozenset[int]) -> int:
    """Run the ranks to the end. `--arch ps --elastic --max-restarts R`: a lost rank (a worker
    or a server) stops the others, and the whole run starts again from its newest checkpoint,
    up to R times (torchrun's model: every server reloads its shard's file, so the steps
    since that checkpoint are redone and no sample is lost or repeated)."""
    from ..launcher import LaunchError, launch

    restarts = config.launch.max_restarts if config.launch.elastic else 0
    argv = to_argv(config)
    for attempt in range(restarts + 1):
        try:
            result = launch(["train", *argv], config.processes, master_addr=config.launch.addr,
                            master_port=config.launch.port, env=env, tolerate=tolerate,
                            restart=attempt, max_restarts=restarts)
        except LaunchError as exc:
            raise UserError(str(exc)) from None
        if result.returncode in (0, *SELF_EXPLAINED) or result.failed_rank is None \
                or attempt == restarts:
            break
        say(f"gradsync: worker rank {result.failed_rank} {result.reason}; restarting every "
            f"rank from the newest checkpoint in {config.checkpoint.dir} (restart "
            f"{attempt + 1} of {restarts})")
        argv = to_argv(replace(config, checkpoint=replace(config.checkpoint, resume=True)))
    if result.returncode == EXIT_INTERRUPTED:
        say("gradsync: interrupted")
    elif result.returncode not in SELF_EXPLAINED and result.failed_rank is not None:
        say(f"gradsync: run failed: worker rank {result.failed_rank} {result.reason}")
    return result.returncode


def run_in_lab(config: TrainConfig, interrupts_raise=lambda: None) -> int:
    """`--lab N`: bring an emulated cluster up, run --procs-per-host ranks per host (LOCAL_RANK,
    LOCAL_WORLD_SIZE and the host's interface from the lab's slots), take it down."""
    from ..lab import LabError, train_in_lab

    lab = config.lab
    env = rank_env(lab.hosts * lab.procs_per_host)  # every host's ranks share these cores
    interrupts_raise()
    rates = lab.rates.split(",") if lab.rates else None
    try:
        return train_in_lab(lab.hosts, lab.rate, rates, to_argv(config), env,
                            procs_per_host=lab.procs_per_host)
    except LabError as exc:
        raise UserError(str(exc)) from None
