"""One rank of `gradsync train`: join the group, build the architecture, train, report.

Run by every process that a launcher started (gradsync's own, torchrun, mpiexec). Each way a
rank can fail ends in one line on stderr and an exit code the launcher understands
(gradsync/exits.py); the summary is printed by the first worker.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .. import comm
from ..exits import EXIT_AGREED, EXIT_INTERRUPTED, EXIT_USAGE, UserError, say
from .config import TrainConfig

log = logging.getLogger("gradsync")


def check_writable(out: str) -> None:
    """Raise UserError unless ``--out`` can be written (created if missing)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradsync-write-test"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _check_launcher(config: TrainConfig) -> None:
    """--elastic needs gradsync's own launcher: it hosts the store or lets a worker go."""
    if not config.launch.elastic:
        return
    if config.observe.timeline or config.observe.tensorboard:
        raise UserError("--timeline and --tensorboard are not built for --elastic yet "
                        "(docs/observability.md)")
    if config.arch != "ps" and "GRADSYNC_ELASTIC_UID" not in os.environ:
        raise UserError("--elastic needs gradsync's own launcher (run `gradsync train "
                        "--elastic` without torchrun): it hosts the rendezvous store")
    if config.arch == "ps" and "GRADSYNC_LAUNCHED" not in os.environ:
        raise UserError("--arch ps --elastic needs gradsync's own launcher (run `gradsync "
                        "train --elastic` without torchrun): it lets a lost worker go")


def _run_elastic(config: TrainConfig) -> int:
    """A worker of `gradsync train --elastic` (the launcher set GRADSYNC_ELASTIC_UID)."""
    from ..allreduce import NonFiniteGradientError
    from ..comm.elastic import ElasticDone, ElasticStopped
    from .elastic_run import run_worker

    try:
        run_worker(config)
    except ElasticStopped:
        return EXIT_AGREED  # the launcher names the lost worker and the minimum
    except ElasticDone:  # a replacement that came too late: nothing to do
        return 0
    except NonFiniteGradientError as exc:  # raised by every member at the same step
        if comm.is_initialized() and comm.get_rank() == 0:
            say(f"gradsync: error: {exc}")
        return EXIT_AGREED
    return 0


def run_links(world_size: int) -> "comm.Topology | None":
    """The links of the run when this process knows them without measuring: the lab it
    runs in (`gradsync lab`), if its slots are the ranks of the run."""
    from ..lab import current
    from ..ps.placement import lab_links

    return lab_links(current(), world_size)


def _train(config: TrainConfig, interrupts_raise) -> int:
    from ..allreduce import NonFiniteGradientError
    from .architecture import build_architecture
    from .summary import format_summary
    from .trainer import train

    group = comm.init_process_group(timeout_s=config.launch.timeout)
    interrupts_raise()
    try:
        architecture = build_architecture(config, group, run_links(group.size))
    except comm.TopologyError:
        raise  # (a ValueError too) every rank says the same: rank 0 alone reports it
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rank0 = architecture.is_worker and architecture.worker_rank == 0
    if rank0 and config.output.out:
        check_writable(config.output.out)
    try:
        summary = train(config, architecture)
    except NonFiniteGradientError as exc:  # raised by every worker at the same step
        if rank0:
            say(f"gradsync: error: {exc}")
        return EXIT_AGREED
    if summary is not None and rank0:
        print(format_summary(summary, architecture), flush=True)
    return 0


def run_rank(config: TrainConfig, interrupts_raise=lambda: None) -> int:
    """This rank's part of the run; returns its exit code. ``interrupts_raise`` is called
    once start-up is over (Ctrl-C then raises KeyboardInterrupt, so that cleanup runs)."""
    from ..checkpoint import CheckpointError, CheckpointRefusedError

    rank = os.environ.get("RANK", "?")
    if config.launch.engine != "auto":
        os.environ["GRADSYNC_ENGINE"] = config.launch.engine
    try:
        _check_launcher(config)
        if "GRADSYNC_ELASTIC_UID" in os.environ:
            return _run_elastic(config)
        return _train(config, interrupts_raise)
    except CheckpointRefusedError:
        return EXIT_USAGE  # rank 0 prints the reason
    except comm.TopologyError as exc:  # every rank checks the same file against the world
        if rank == "0":
            say(f"gradsync: error: --topology: {exc}")
        return EXIT_USAGE
    except (UserError, CheckpointError) as exc:
        say(f"gradsync: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line per failed rank; launcher names the cause
        log.debug("rank %s failed", rank, exc_info=True)
        say(f"gradsync: rank {rank}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        try:
            comm.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may be broken by a lost peer
            pass
