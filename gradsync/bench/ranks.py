"""Where a benchmark's ranks run, shared by `gradsync bench collectives` and `bench topology`.

Started directly, a command is a controller: it starts its ranks locally (``--workers``) or
across an emulated cluster (``--lab N`` with ``--rate``/``--rates`` and ``--procs-per-host``)
and reads rank 0's results (:func:`run_for_result`, also `bench.pushpull`'s). Under a launcher
(RANK and WORLD_SIZE set) the process is a rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..exits import EXIT_USAGE


def usage(message: str) -> int:
    """Print the one-line error and return the usage exit status."""
    print(f"gradsync: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def add_placement_flags(p: argparse.ArgumentParser, lab_help: str) -> None:
    """--workers, --lab, --rate, --rates, --procs-per-host."""
    p.add_argument("--workers", type=int, default=2, help="local ranks")
    p.add_argument("--lab", type=int, metavar="N", help=lab_help)
    p.add_argument("--rate", help="every lab link's rate, e.g. 1gbit (default 1gbit)")
    p.add_argument("--rates", metavar="R1,R2,...", help="one rate per lab host instead")
    p.add_argument("--procs-per-host", type=int, default=1, metavar="L",
                   help="ranks on each lab host")


def check_placement(args: argparse.Namespace, least: int) -> str | None:
    """What is wrong with the placement flags (None: nothing); fills in the default rate."""
    ranks = args.lab if args.lab is not None else args.workers
    if ranks < least:
        return f"need at least {least} rank{'s' * (least > 1)}: --workers N or --lab N with " \
               f"N >= {least}"
    if (args.rates or args.rate or args.procs_per_host != 1) and not args.lab:
        return "--rate, --rates and --procs-per-host need --lab N"
    if args.procs_per_host < 1:
        return f"--procs-per-host must be at least 1, got {args.procs_per_host}"
    args.rate = args.rate or "1gbit"
    return None


def lab_from_env() -> dict | None:
    """Under `gradsync lab run`: the lab's link rates and ranks per host."""
    from ..lab import current

    lab = current()
    return None if lab is None else describe_lab(lab)


def describe_lab(lab) -> dict:
    return {"name": lab.name, "prefix": lab.prefix, "rates_bits": [h.rate for h in lab.hosts],
            "procs_per_host": lab.procs_per_host}


def run_ranks(argv: list[str], args: argparse.Namespace) -> tuple[int, dict | None]:
    """Run ``gradsync *argv`` as the ranks, locally (``args.workers``) or across a lab of
    ``args.lab`` hosts; returns (exit status, :func:`describe_lab` of the lab or None)."""
    env = {"OMP_NUM_THREADS": "1"}  # one compute thread per rank
    if not args.lab:
        from ..launcher import LaunchError, launch

        try:
            done = launch(argv, args.workers, env=env)
        except LaunchError as exc:
            return usage(str(exc)), None
        if done.returncode != 0 and done.failed_rank is not None:
            print(f"gradsync: bench failed: worker rank {done.failed_rank} {done.reason}",
                  file=sys.stderr, flush=True)
        return done.returncode, None
    from ..lab import lab_launch, up

    env["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # lab addresses have no reverse DNS: c10d warns
    rates = [r.strip() for r in args.rates.split(",")] if args.rates else None
    # down on any exit, Ctrl-C included
    with up(args.lab, args.rate, rates, args.procs_per_host) as lab:
        return lab_launch(lab, argv, env=env), describe_lab(lab)


def run_for_result(argv: list[str], args: argparse.Namespace | None = None, *,
                   launch: Callable[[list[str]], tuple[int, dict | None]] | None = None
                   ) -> tuple[int, dict | None, dict | None]:
    """Run the ranks with ``--result-file FILE`` added to ``argv``; read back the JSON that
    rank 0 wrote there.

    Args:
        argv: the ranks' arguments (after ``gradsync`` for :func:`run_ranks`).
        args: the placement flags, for :func:`run_ranks`.
        launch: starts the ranks instead of :func:`run_ranks`: ``launch(argv)`` returns
            ``(exit status, describe_lab of the lab or None)``.

    Returns:
        ``(exit status, rank 0's result, the lab or None)``; the result is None unless the
        status is 0. A lab that cannot start is a one-line error with the usage status.
    """
    from ..lab import LabError

    with tempfile.TemporaryDirectory(prefix="gradsync-bench-") as tmp:
        path = Path(tmp) / "result.json"
        argv = [*argv, "--result-file", str(path)]
        try:
            rc, lab = launch(argv) if launch is not None else run_ranks(argv, args)
        except LabError as exc:
            return usage(str(exc)), None, None
        if rc != 0:
            return rc, None, None
        try:
            return 0, json.loads(path.read_text()), lab
        except (OSError, ValueError) as exc:  # the ranks exited 0 without writing it
            print(f"gradsync: bench failed: rank 0's results unreadable: {exc}",
                  file=sys.stderr, flush=True)
            return 1, None, None
