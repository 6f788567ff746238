"""Where a benchmark's ranks run, shared by `gradsync bench collectives` and `bench topology`.

Started directly, a command is a controller: it starts its ranks locally (``--workers``) or
across an emulated cluster (``--lab N`` with ``--rate``/``--rates`` and ``--procs-per-host``)
and reads rank 0's results. Under a launcher (RANK and WORLD_SIZE set) the process is a rank.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


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
