"""`gradsync bench collectives`: bus bandwidth of collectives per algorithm, nccl-tests style.

    gradsync bench collectives                                  # all_reduce, 1K..64M, 2 workers
    gradsync bench collectives -b 1M -e 64M -f 2 --algorithm ring,native --json ar.json
    gradsync bench collectives --op reduce_scatter --dtype bfloat16 --redop max --check
    gradsync bench collectives --lab 4 --rates 1gbit,1gbit,1gbit,250mbit -b 1M -e 64M \\
        --plot slow.png                                         # an emulated cluster (root)
    gradsync bench collectives --engine mpi --algorithm native,shm   # ranks under mpiexec
    torchrun --nproc-per-node 4 -m gradsync bench collectives   # each process is a rank

The measuring is gradsync.bench.sweep's, on every rank. Started directly, the command is a
controller: it runs the ranks (locally with gradsync.launcher, or across a lab's hosts with
gradsync.lab), reads rank 0's results from a file and reports them. Under a launcher
(RANK and WORLD_SIZE set: torchrun, `gradsync lab run`) the process is a rank and rank 0
reports. busbw = S/t * factor (shared/ANCHORS.md); in a lab every busbw is also given as a
fraction of the slowest link, which bounds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..comm import ENGINE_REGISTRY
from ..exits import under_launcher
from . import busbw
from .ranks import add_placement_flags, check_placement, lab_from_env, run_for_result, usage
from .report import machine_line
from .sweep import ALGORITHMS, DTYPES, REDOPS, SweepConfig, format_size, parse_size


def finish(cfg: SweepConfig, args: argparse.Namespace, raw: dict, lab: dict | None,
           machine: str) -> dict:
    """Print the table and write --json / --plot; returns the report.

    Args:
        raw: what :func:`~gradsync.bench.sweep.run_sweep` returned on rank 0.
        lab: ``{"name", "prefix", "rates_bits"}`` (a link rate per rank's host), or None.
        machine: :func:`~gradsync.bench.report.machine_line` from the start of the run.
    """
    from .costfit import cost_model_report

    if lab is not None:
        lab = {**lab, **busbw.lab_bounds(cfg.op, lab["rates_bits"], lab["procs_per_host"])}
    rows = busbw.rows(cfg, raw, lab)
    ran = dict.fromkeys(r["algorithm"] for r in rows)   # shm only on one host, and its floor
    avg = {a: sum(r["busbw_gbs"] for r in rows if r["algorithm"] == a)
           / sum(r["algorithm"] == a for r in rows) for a in ran}
    report = {"benchmark": "collectives", "command": command(cfg, args),
              "machine": f"{machine} at the start, {os.getloadavg()[0]:.2f} at the end",
              "op": cfg.op, "dtype": cfg.dtype, "redop": cfg.shown_redop, "root": cfg.root,
              "world": raw["world"], "engine": raw.get("engine"), "config": vars(cfg),
              "lab": lab, "rows": rows,
              "topology": raw.get("topology"), "auto_chose": raw.get("auto_chose"),
              "avg_busbw_gbs": avg}
    busbw.print_table(cfg, report)
    if cfg.op == "all_reduce":
        report["cost_model"] = cost_model_report(raw, rows)
    busbw.print_averages(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        busbw.write_plot(args.plot, report)
    return report


# --- command line and the ways to run ----------------------------------------------------------

def rank_flags(cfg: SweepConfig) -> list[str]:
    """The flags that give a rank the same sweep."""
    flags = ["-b", format_size(cfg.minbytes), "-e", format_size(cfg.maxbytes),
             "-f", str(cfg.stepfactor), "-n", str(cfg.iters), "-w", str(cfg.warmup_iters),
             "--op", cfg.op, "--dtype", cfg.dtype, "--redop", cfg.redop,
             "--algorithm", ",".join(cfg.algorithms)]
    return flags + ["--check"] * cfg.check + ["--calibrate"] * cfg.calibrate


def command(cfg: SweepConfig, args: argparse.Namespace) -> str:
    """The command that reproduces this run, every setting spelled out."""
    under = under_launcher()
    if under:
        where = []
    elif args.lab:
        where = ["--lab", str(args.lab)] + (["--rates", args.rates] if args.rates
                                            else ["--rate", args.rate])
        where += ["--procs-per-host", str(args.procs_per_host)] * (args.procs_per_host > 1)
    else:
        where = ["--workers", str(args.workers)] + ["--engine", "mpi"] * (args.engine == "mpi")
    out = [f for flag in ("json", "plot") if getattr(args, flag)
           for f in (f"--{flag}", getattr(args, flag))]
    line = shlex.join(["gradsync", "bench", "collectives", *rank_flags(cfg), *where, *out])
    return f"{line}   (run by each of {os.environ['WORLD_SIZE']} ranks)" if under else line


def _mpiexec() -> str | None:
    """The MPI launcher beside this Python (the mpich wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    import shutil

    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _run_under_mpiexec(argv: list[str], workers: int) -> int:
    """Run ``gradsync *argv`` as ``workers`` MPI ranks; every rank adopts MPI's
    environment (cli._adopt_mpi_launcher), so the engine is MPI."""
    launcher = _mpiexec()
    if launcher is None or importlib.util.find_spec("mpi4py") is None:
        return usage("--engine mpi needs mpi4py and an MPI launcher: pip install 'gradsync[mpi]'")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", GRADSYNC_ENGINE="mpi")
    done = subprocess.run([launcher, "-n", str(workers), sys.executable, "-m", "gradsync",
                           *argv], env=env)
    return done.returncode


def _as_rank(cfg: SweepConfig, args: argparse.Namespace, machine: str) -> int:
    from .. import comm
    from .sweep import run_sweep

    group = comm.init_process_group()
    try:
        # Across hosts, measure the links so that aware, hierarchical and auto know them.
        topology = comm.probe_topology(group)
        comm.set_topology(topology, group)
        raw = run_sweep(cfg, group)
        raw["topology"] = json.loads(topology.to_json())
    finally:
        comm.destroy_process_group()
    if group.rank == 0:
        if args.result_file:
            Path(args.result_file).write_text(json.dumps(raw))
        else:
            finish(cfg, args, raw, lab_from_env(), machine)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run `gradsync bench collectives`; returns the exit status."""
    try:
        cfg = SweepConfig(args.minbytes, args.maxbytes, args.stepfactor, args.iters,
                          args.warmup_iters, args.op, args.dtype, args.redop,
                          tuple(a.strip() for a in args.algorithm.split(",")), args.check,
                          args.calibrate)
    except ValueError as exc:
        return usage(str(exc))
    if args.calibrate and cfg.op != "all_reduce":
        return usage("--calibrate fits the all_reduce cost model; it needs --op all_reduce")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return usage("--plot needs matplotlib (pip install 'gradsync[plot]')")
    machine = machine_line()
    if under_launcher():
        if args.lab:
            return usage("--lab starts its own ranks; run it directly, not under a launcher")
        return _as_rank(cfg, args, machine)
    wrong = check_placement(args, least=2)
    if wrong:
        return usage(wrong)
    if args.engine == "mpi" and args.lab:
        return usage("--engine mpi runs its ranks on this host with mpiexec; a lab runs torch")
    # --engine mpi: mpiexec starts the ranks (on this host), not the launcher or a lab
    mpi = (lambda argv: (_run_under_mpiexec(argv, args.workers), None))
    rc, raw, lab = run_for_result(["bench", "collectives", *rank_flags(cfg)], args,
                                  launch=mpi if args.engine == "mpi" else None)
    if rc != 0:
        return rc
    finish(cfg, args, raw, lab, machine)
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "collectives", help="bus bandwidth of collectives per algorithm (nccl-tests style)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-b", "--minbytes", type=_size, default="1K", help="smallest size S")
    p.add_argument("-e", "--maxbytes", type=_size, default="64M", help="largest size S")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size multiplier")
    p.add_argument("-n", "--iters", type=int, default=30,
                   help="timed iterations per size (scaled down above 16 MiB, at least 10)")
    p.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed iterations")
    p.add_argument("--op", choices=tuple(ALGORITHMS), default="all_reduce")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--redop", choices=REDOPS, default="sum")
    p.add_argument("--algorithm", default="all",
                   help="one, several (comma-separated) or all; " + "; ".join(
                       f"{op}: {','.join(names)}" for op, names in ALGORITHMS.items()))
    p.add_argument("--engine", choices=tuple(ENGINE_REGISTRY), default="torch",
                   help="the engine of the ranks: torch.distributed (gloo), or MPI (the ranks "
                        "run under mpiexec)")
    p.add_argument("-c", "--check", action="store_true",
                   help="check every iteration's result, not only the first")
    add_placement_flags(p, "run across an emulated cluster of N hosts (needs root)")
    p.add_argument("--calibrate", action="store_true",
                   help="all_reduce: also fit gradsync.comm.calibrate()'s cost model")
    p.add_argument("--json", metavar="FILE", help="write the report to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="busbw against size")
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # a rank's results, for the controller
    p.set_defaults(bench=main)
