"""The `gradsync` command line.

    gradsync train                                  # digits-mlp on 2 local workers
    gradsync train --workload stdlib-gpt --workers 2 --out runs/gpt
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-endpoint HOST:29500 -m gradsync train

Run directly, `gradsync train` starts its workers with gradsync's local launcher
(gradsync/train/launch.py); under torchrun (or as one of the launcher's workers) it is a
rank itself (gradsync/train/worker.py). This module only parses and dispatches. User errors
print one line and exit with status 2; a failed run exits non-zero naming the rank that
failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import env
from .exits import EXIT_INTERRUPTED, EXIT_USAGE, UserError, say, under_launcher
from .flags import add_dataclass_arguments, config_from_args


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
    from .run.cli import add_parser as add_run_parser

    add_run_parser(sub)
    from .run.rdzv import add_parser as add_rdzv_parser

    add_rdzv_parser(sub)
    from .lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from .plan.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _exit_rank(code: int, timeout_s: float) -> None:
    """End a rank whose process group is destroyed and whose output is written.

    It leaves without the interpreter's finalization: an engine thread still alive then (a
    store client, a gloo worker) can abort the process ("terminate called without an active
    exception", SIGABRT) and turn a finished run into a failed one. MPI, when this rank
    initialised it, is finalized first (else MPICH leaves its /dev/shm segment behind), but
    only after a rank that ended well: MPI_Finalize may wait for the other ranks, and after
    a failure one of them may never come. A timer ends the rank with its status all the same
    if the finalize outlasts ``timeout_s`` (the run's communication timeout).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        from .comm.mpi_launcher import finalize_mpi

        timer = threading.Timer(timeout_s, os._exit, (code,))
        timer.daemon = True
        timer.start()
        finalize_mpi()
    os._exit(code)


def _exit_interrupted(signum: int, frame: object) -> None:
    # Start-up (importing torch, parsing, joining the group) holds nothing to clean up, and a
    # KeyboardInterrupt raised inside torch's import can abort the process from C++.
    if not under_launcher():  # the launcher speaks for its workers
        say("gradsync: interrupted")
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
        if not under_launcher():
            say("gradsync: interrupted")
        return EXIT_INTERRUPTED
    finally:
        _interrupts_raise()
        if "gradsync.launcher.zygote" in sys.modules:
            sys.modules["gradsync.launcher.zygote"].discard()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # a launcher: it starts without importing torch
        return _run(argv)
    if _launches_local_ranks(argv):  # their zygote imports torch beside us (launcher/zygote.py)
        from .launcher.zygote import prestart

        prestart("gradsync")
    from .comm.engines import ENGINES

    try:  # every GRADSYNC_* variable, checked as flags are: one line, before anything starts
        env.validate(ENGINES)
    except ValueError as exc:
        say(f"gradsync: error: {exc}")
        return EXIT_USAGE
    logging.basicConfig(level=env.log_level(), format="%(asctime)s %(name)s: %(message)s")
    from .comm.mpi_launcher import adopt_mpi_launcher

    adopt_mpi_launcher()  # under mpiexec/srun: RANK, WORLD_SIZE and the engine from MPI's
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
        code = args.bench(args)
        if under_launcher():  # one rank of a benchmark: it ends as a training rank does
            _exit_rank(code, float(getattr(args, "timeout", None) or 60.0))
        return code
    if args.command == "serve":
        from .serve.cli import main as serve_main

        return serve_main(args)
    if args.command == "plan":
        from .plan.cli import main as plan_main

        return _reported(plan_main, args)
    if args.command == "rdzv":
        from .run.rdzv import main as rdzv_main

        return _reported(rdzv_main, args)
    return _train(args)


# Set under mpiexec or srun before gradsync adopts them as RANK and WORLD_SIZE.
_MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _launches_local_ranks(argv: list[str]) -> bool:
    """Whether this `gradsync train` most likely starts its ranks here through launch()
    (read from the raw arguments: the flags' parser itself needs torch). A wrong guess
    costs a zygote that is killed unused at exit."""
    try:
        wanted = env.zygote()
    except ValueError:  # said by env.validate, next
        return False
    if not wanted or argv[:1] != ["train"] or under_launcher() or any(
            v in os.environ for v in _MPI_RANK_VARIABLES):
        return False
    flags = {a.split("=")[0] for a in argv[1:]}
    # --arch auto times the workload first: nothing may run beside it.
    auto = "--arch=auto" in argv or any(a == "--arch" and b == "auto"
                                        for a, b in zip(argv, argv[1:]))
    return not auto and not flags & {"-h", "--help", "--lab", "--elastic"}


def _reported(main, args: argparse.Namespace) -> int:
    """``main(args)``; a UserError it raises is one line on stderr and exit 2."""
    try:
        return main(args)
    except UserError as exc:
        say(f"gradsync: error: {exc}")
        return EXIT_USAGE


def _run(argv: list[str]) -> int:
    """`gradsync run`: a user's script on several processes. Its ranks check their own
    GRADSYNC_* variables when they use gradsync; the launcher reads only GRADSYNC_LOG."""
    from .run.cli import add_parser, main as run_main, normalize_argv

    try:
        level = env.log_level()
    except ValueError as exc:
        say(f"gradsync: error: {exc}")
        return EXIT_USAGE
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    _interrupts_raise()  # the supervisor forwards Ctrl-C to the ranks
    parser = _Parser(prog="gradsync")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return _reported(run_main, parser.parse_args(normalize_argv(argv)))


def _train(args: argparse.Namespace) -> int:
    """`gradsync train`: a rank of a launched run, or the launcher of a local one."""
    from .train.config import TrainConfig

    try:
        config = config_from_args(TrainConfig, args)
        if under_launcher():
            from .train.worker import run_rank

            _exit_rank(run_rank(config, _interrupts_raise), config.launch.timeout)
        from .train.launch import run_local

        return run_local(config, _interrupts_raise)
    except UserError as exc:
        say(f"gradsync: error: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
