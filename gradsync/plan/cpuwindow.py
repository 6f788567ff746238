"""Where one `gradsync train` run's CPU goes, per step, over a window of its steps: the
ranks' own user and system time, the whole machine's busy time (the kernel's forwarding
through a lab's bridge included: softirq), and its idle time.

It samples /proc/stat and /proc/PID/stat of every process under the run twice, when 30 %
and 90 % of the steps are done (read from metrics.jsonl as the run writes it), so neither
start-up nor the end is counted. What calibrate.py reads the machine's constants from, and
what benchmarks/plan_cpu.py prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..bench.procstat import descendants, machine_cpu_s, process_cpu_s

WINDOW = (0.3, 0.9)


def run_accounted(train_argv: list[str], steps: int, timeout_s: float = 600.0,
                  env: dict[str, str] | None = None) -> dict:
    """Run `gradsync train TRAIN_ARGV --steps STEPS` and account its window of steps: per
    step, in seconds, ``wall``, ``ranks_user``, ``ranks_system``, ``busy`` (every core's
    non-idle time), ``softirq``, ``idle``; and the summary's ``median_step``. ``env``:
    variables set for the run beside this process's.

    Raises:
        RuntimeError: the run failed or did not finish in ``timeout_s`` (its stderr's tail).
    """
    with tempfile.TemporaryDirectory(prefix="gradsync-cpu-") as out:
        metrics = Path(out) / "metrics.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", *train_argv,
                                 "--steps", str(steps), "--no-progress", "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout_s
        try:
            taken = []
            for frac in WINDOW:
                while (_steps_done(metrics) < frac * steps and proc.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.02)  # polling a run from outside it
                taken.append(_snapshot(proc.pid, metrics))
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise RuntimeError(f"`gradsync train {' '.join(train_argv)}` ran past "
                               f"{timeout_s:g} s") from None
        summary = Path(out) / "summary.json"
        if proc.returncode != 0 or not summary.exists():
            tail = err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise RuntimeError(f"`gradsync train {' '.join(train_argv)}` failed: {tail[0]}")
        return _per_step(*taken, json.loads(summary.read_text()))


def _steps_done(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except OSError:
        return 0


def _snapshot(root: int, metrics: Path) -> dict:
    ranks = {}
    for pid in descendants(root):
        try:
            ranks[pid] = process_cpu_s(pid)
        except OSError:
            continue  # exited since the listing
    return {"t": time.monotonic(), "step": _steps_done(metrics), "machine": machine_cpu_s(),
            "ranks": ranks}


def _per_step(a: dict, b: dict, summary: dict) -> dict:
    n = b["step"] - a["step"]
    if n <= 0:
        raise RuntimeError("the run ended before its window of steps (too few --steps)")
    ranks = [p for p in b["ranks"] if p in a["ranks"]]
    d = {k: b["machine"][k] - a["machine"][k] for k in a["machine"]}
    idle = d["idle"] + d["iowait"]
    steal = d.get("steal", 0.0)  # the hypervisor ran another machine: not this one's work
    return {"steps": n, "wall": (b["t"] - a["t"]) / n,
            "ranks_user": sum(b["ranks"][p][0] - a["ranks"][p][0] for p in ranks) / n,
            "ranks_system": sum(b["ranks"][p][1] - a["ranks"][p][1] for p in ranks) / n,
            "busy": (sum(d.values()) - idle - steal) / n, "softirq": d["softirq"] / n,
            "system": d["system"] / n, "user": d["user"] / n, "idle": idle / n,
            "steal": steal / n,
            "cores": os.cpu_count(), "median_step": summary["step_time_ms_median"] / 1e3,
            "bytes_per_step_per_worker": summary.get("bytes_per_step_per_worker")}
