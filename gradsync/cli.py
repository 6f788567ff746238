"""The `gradsync` command line.

    gradsync train                                  # digits-mlp on 2 local workers
    gradsync train --workload stdlib-gpt --workers 2 --out runs/gpt
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-endpoint HOST:29500 -m gradsync train

Run directly, `gradsync train` starts its workers with gradsync's local launcher; under
torchrun (or as one of the launcher's workers) it is a worker itself. User errors print one
line and exit with status 2; a failed run exits non-zero naming the rank that failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .flags import add_dataclass_arguments, dataclass_from_args, to_argv

log = logging.getLogger("gradsync")

# (launcher.SELF_EXPLAINED lists these: a rank exiting with one has said why itself)
EXIT_USAGE = 2
EXIT_AGREED = 3  # every rank stopped for one reason, which rank 0 printed
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``--help`` still shows the usage)."""

    def error(self, message: str):
        print(f"gradsync: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from .train.config import TrainConfig

    parser = _Parser(prog="gradsync", description="Data-parallel training "
                                     "for PyTorch: all-reduce and parameter-server architectures.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a workload on several worker processes",
                           description="Train a workload data-parallel on several workers.")
    add_dataclass_arguments(train, TrainConfig)
    from .lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _check_writable(out: str) -> None:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradsync-write-test"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _say(line: str) -> None:
    """One line on stderr in one write, so that the lines of several ranks never interleave."""
    sys.stderr.flush()
    os.write(2, (line + "\n").encode(errors="replace"))


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _adopt_mpi_launcher() -> None:
    """Under mpiexec/srun (an MPI environment, no torchrun): each process is a rank, so
    RANK and WORLD_SIZE come from the MPI launcher and the engine is MPI."""
    from .comm.mpi import mpi_environment

    env = os.environ
    if _under_launcher() or not mpi_environment():
        return
    rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
    size = env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE"))
    if rank is not None and size is not None:
        env.update(RANK=rank, WORLD_SIZE=size)
        env.setdefault("GRADSYNC_ENGINE", "mpi")


def _run_worker(config) -> int:
    """One rank of the run: join the group, train, print the summary on rank 0."""
    from . import comm
    from .train.architecture import build_architecture
    from .allreduce import NonFiniteGradientError
    from .checkpoint import CheckpointError, CheckpointRefusedError
    from .train.trainer import format_summary, train

    rank = os.environ.get("RANK", "?")
    if config.launch.engine != "auto":
        os.environ["GRADSYNC_ENGINE"] = config.launch.engine
    try:
        if config.launch.elastic and config.arch != "ps" \
                and "GRADSYNC_ELASTIC_UID" not in os.environ:
            raise UserError("--elastic needs gradsync's own launcher (run `gradsync train "
                            "--elastic` without torchrun): it hosts the rendezvous store")
        if config.launch.elastic and config.arch == "ps" and "GRADSYNC_LAUNCHED" not in os.environ:
            raise UserError("--arch ps --elastic needs gradsync's own launcher (run `gradsync "
                            "train --elastic` without torchrun): it lets a lost worker go")
        if "GRADSYNC_ELASTIC_UID" in os.environ:  # a worker of `gradsync train --elastic`
            from .comm.elastic import ElasticDone, ElasticStopped
            from .train.elastic_run import run_worker

            try:
                run_worker(config, format_summary)
            except ElasticStopped:
                return EXIT_AGREED  # the launcher names the lost worker and the minimum
            except ElasticDone:  # a replacement that came too late: nothing to do
                return 0
            except NonFiniteGradientError as exc:  # raised by every member at the same step
                if comm.is_initialized() and comm.get_rank() == 0:
                    _say(f"gradsync: error: {exc}")
                return EXIT_AGREED
            return 0
        group = comm.init_process_group(timeout_s=config.launch.timeout)
        _interrupts_raise()
        try:
            architecture = build_architecture(config, group)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if architecture.is_worker and architecture.worker_rank == 0 and config.output.out:
            _check_writable(config.output.out)
        summary = train(config, architecture)
        if summary is not None and architecture.worker_rank == 0:
            print(format_summary(summary), flush=True)
        return 0
    except CheckpointRefusedError:
        return EXIT_USAGE  # rank 0 prints the reason
    except comm.TopologyError as exc:  # every rank checks the same file against the world
        if rank == "0":
            _say(f"gradsync: error: --topology: {exc}")
        return EXIT_USAGE
    except NonFiniteGradientError as exc:  # raised by every worker at the same step
        if architecture.worker_rank == 0:
            _say(f"gradsync: error: {exc}")
        return EXIT_AGREED
    except (UserError, CheckpointError) as exc:
        _say(f"gradsync: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line per failed rank; launcher names the cause
        log.debug("rank %s failed", rank, exc_info=True)
        _say(f"gradsync: rank {rank}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        try:
            comm.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may be broken by a lost peer
            pass


def _exit_rank(code: int) -> None:
    """End a rank whose process group is destroyed and whose output is written.

    It leaves without the interpreter's finalization: an engine thread still alive then (a
    store client, a gloo worker) can abort the process ("terminate called without an active
    exception", SIGABRT) and turn a finished run into a failed one.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _local_server_ranks(config) -> frozenset[int]:
    """The ranks that serve in a local PS run (the first ``--servers`` unless
    ``--server-ranks`` lists them; "colocated" on one host is rank 0)."""
    from .ps.placement import parse_server_ranks

    spec = config.ps.server_ranks
    if spec is None:
        return frozenset(range(config.ps.servers))
    ranks = parse_server_ranks(spec)
    if ranks == "colocated":
        return frozenset({0})
    ranks = frozenset(ranks)
    if max(ranks) >= config.processes:
        raise UserError(f"--server-ranks {spec}: this run has {config.processes} processes "
                        f"(ranks 0..{config.processes - 1}: --workers {config.launch.workers} "
                        f"+ --servers {config.ps.servers})")
    return ranks


def _run_local(config) -> int:
    """Start ``config.launch.workers`` local processes with the launcher and supervise them."""
    from .launcher import SELF_EXPLAINED, LaunchError, launch

    if config.output.out:
        _check_writable(config.output.out)
    if config.checkpoint.dir and Path(config.checkpoint.dir).exists() \
            and not Path(config.checkpoint.dir).is_dir():
        raise UserError(f"--checkpoint-dir {config.checkpoint.dir} is a file, not a directory")
    # Share the cores between the workers instead of letting each start one thread per core.
    threads = str(max(1, (os.cpu_count() or 1) // config.launch.workers))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
           # c10d's warnings (with C++ stack traces) when a peer's store connection breaks
           # repeat what gradsync's own one-line errors say, naming the rank.
           "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
    if config.lab.hosts:
        return _run_in_lab(config, env)
    # The servers of an asynchronous (or elastic) parameter server drop a lost worker and go
    # on; an elastic run still stops when its first worker, which evaluates and writes the
    # summary, is lost.
    servers = _local_server_ranks(config) if config.arch == "ps" else frozenset()
    tolerate = frozenset(range(config.processes)) - servers \
        if config.arch == "ps" and (config.ps.consistency != "sync" or config.launch.elastic) \
        else frozenset()
    if config.arch == "ps" and config.launch.elastic:
        tolerate -= {min(tolerate)}
    _interrupts_raise()  # the launcher forwards an interrupt to the workers it started
    if config.launch.elastic and config.arch != "ps":  # the rendezvous store lives here
        from .train.elastic_run import run_local as run_elastic

        return run_elastic(config, env)
    try:
        result = launch(["train", *to_argv(config)], config.processes,
                        master_addr=config.launch.addr, master_port=config.launch.port, env=env,
                        tolerate=tolerate)
    except LaunchError as exc:
        raise UserError(str(exc)) from None
    if result.returncode == EXIT_INTERRUPTED:
        _say("gradsync: interrupted")
    elif result.returncode not in SELF_EXPLAINED and result.failed_rank is not None:
        print(f"gradsync: run failed: worker rank {result.failed_rank} {result.reason}",
              file=sys.stderr, flush=True)
    return result.returncode


def _run_in_lab(config, env: dict[str, str]) -> int:
    """`--lab N`: bring an emulated cluster up, run one rank per host, take it down."""
    from .lab import LabError, train_in_lab

    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.lab.hosts))
    _interrupts_raise()
    # (TORCH_CPP_LOG_LEVEL=ERROR also hides c10d's warning that lab addresses have no
    # reverse DNS entry.)
    rates = config.lab.rates.split(",") if config.lab.rates else None
    try:
        return train_in_lab(config.lab.hosts, config.lab.rate, rates, to_argv(config), env)
    except LabError as exc:
        raise UserError(str(exc)) from None


def _exit_interrupted(signum: int, frame: object) -> None:
    # Start-up (importing torch, parsing, joining the group) holds nothing to clean up, and a
    # KeyboardInterrupt raised inside torch's import can abort the process from C++.
    if not _under_launcher():  # the launcher speaks for its workers
        _say("gradsync: interrupted")
    os._exit(EXIT_INTERRUPTED)


def _interrupts_raise() -> None:
    """Start-up is over: Ctrl-C raises KeyboardInterrupt again, so that cleanup runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """The `gradsync` command; returns the exit status. Ctrl-C at any moment (even while
    torch is being imported) ends it with status 130 and no traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if not _under_launcher():
            _say("gradsync: interrupted")
        return EXIT_INTERRUPTED
    finally:
        _interrupts_raise()


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=os.environ.get("GRADSYNC_LOG", "WARNING").upper(),
                        format="%(asctime)s %(name)s: %(message)s")
    _adopt_mpi_launcher()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command != "train":
        _interrupts_raise()  # the lab and benchmarks clean up after an interrupt
    if args.command == "lab":
        from .lab.cli import main as lab_main

        return lab_main(args)
    if args.command == "bench":
        return args.bench(args)
    if args.command == "serve":
        from .serve.cli import main as serve_main

        return serve_main(args)
    try:
        from .train.config import TrainConfig

        try:
            config = dataclass_from_args(TrainConfig, args)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if _under_launcher():
            _exit_rank(_run_worker(config))
        return _run_local(config)
    except UserError as exc:
        _say(f"gradsync: error: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
