"""gradsync's benchmarks, and the few helpers they share.

Each benchmark is a module that runs from the repository root in two ways::

    python -m benchmarks.bench_dataparallel        # or: python benchmarks/bench_dataparallel.py
    python -m benchmarks.bench_allreduce

The process you start is a launcher: it runs the benchmark's workers with
:func:`gradsync.launcher.launch` (``python -m benchmarks.<name> --worker ...`` per rank), and
rank 0 hands its measurements back through a JSON file, which the launcher prints as a table
together with the machine and the command that reproduces it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """What the figures were measured on: cores, CPU model, load, torch and Python versions."""
    import torch  # late: the launcher itself needs no torch until it reports

    from gradsync.bench.report import cpu_model

    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu": cpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def describe_machine(m: dict, watch: dict | None = None) -> str:
    text = (f"{m['nproc']} cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}, "
            f"Linux {m['kernel']}, load average {m['loadavg_1m']} at start")
    if watch:
        text += (f"\n# other load during the run: {watch['foreign_cores']:.2f} cores busy with "
                 f"other processes, {watch['steal_cores']:.2f} stolen, over {watch['wall_s']} s")
    return text


def _machine_busy_s() -> tuple[float, float]:
    """(busy, steal) seconds of the whole machine since boot (all cores)."""
    from gradsync.bench.procstat import machine_cpu_s

    try:
        cpu = machine_cpu_s()
    except (OSError, ValueError):
        return 0.0, 0.0
    return sum(cpu[k] for k in ("user", "nice", "system", "irq", "softirq")), cpu["steal"]


def _own_cpu_s() -> float:
    # Children count once reaped; launch() reaps every worker before it returns.
    me, kids = (resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """How busy the machine was with *other* work while the benchmark ran.

    ``foreign_cores`` is the machine's busy CPU time minus this process's and its reaped
    children's, per second of wall time: 0 on a quiet machine, 1 when another job kept a core
    busy throughout. ``steal_cores`` is time the hypervisor gave to other guests.
    """

    def __enter__(self) -> "CpuWatch":
        self._t, self._cpu, (self._busy, self._steal) = (time.monotonic(), _own_cpu_s(),
                                                         _machine_busy_s())
        return self

    def __exit__(self, *exc) -> None:
        wall = max(1e-9, time.monotonic() - self._t)
        busy, steal = _machine_busy_s()
        own = _own_cpu_s() - self._cpu
        self.result = {"wall_s": round(wall, 1),
                       "foreign_cores": round(max(0.0, busy - self._busy - own) / wall, 2),
                       "steal_cores": round((steal - self._steal) / wall, 2)}


def summarize(values: list[float]) -> dict:
    """Median and spread of repeated measurements: min, max and the quartiles."""
    xs = sorted(values)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "n": len(xs)}


def command(module: str, argv: list[str]) -> str:
    """The shell command that reruns ``module`` with ``argv`` from the repository root."""
    python = sys.executable
    try:  # .venv/bin/python reads better than an absolute path into this checkout
        python = str(Path(python).relative_to(REPO))
    except ValueError:
        pass
    return shlex.join([python, "-m", module, *argv])


def add_worker_flags(parser) -> None:
    """The hidden flags :func:`run_workers` passes to each rank of a benchmark."""
    import argparse

    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)


def run_workers(module: str, argv: list[str], nprocs: int) -> dict:
    """Run ``python -m module *argv --worker --result-file F`` on ``nprocs`` ranks.

    Each worker gets OMP_NUM_THREADS=1 (one compute thread per process: two workers on two
    cores must not oversubscribe them) and the repository root on PYTHONPATH, so the module is
    found whatever the current directory is.

    Returns:
        The dict rank 0 wrote to F, with ``cpu_watch``: :class:`CpuWatch`'s figures.
    Raises:
        SystemExit: with the failing worker's exit code, if a worker failed.
    """
    from gradsync.launcher import launch

    env = {"OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.getenv("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gradsync-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        with CpuWatch() as watch:
            result = launch([*argv, "--worker", "--result-file", str(result_file)], nprocs,
                            module=module, env=env)
        if result.returncode != 0:
            print(f"benchmark failed: worker rank {result.failed_rank} {result.reason}",
                  file=sys.stderr)
            raise SystemExit(result.returncode)
        return {**json.loads(result_file.read_text()), "cpu_watch": watch.result}


def write_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
