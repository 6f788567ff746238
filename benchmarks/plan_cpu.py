"""Where a lab run's CPU goes, per step: the ranks' own user and system time, the kernel's
interrupt work, and what stays idle (issue 25: the planner's CPU budget on shared cores).

    flock -x /tmp/gradsync-bench.lock .venv/bin/python benchmarks/plan_cpu.py \\
        --steps 300 -- --workload digits-mlp --lab 5 --rate 1gbit --algorithm ring

Runs `gradsync train ARGS --steps N --out DIR`, and while steps 30 % .. 90 % of them run
(read from metrics.jsonl as they are written), samples /proc/stat (every core's user,
system, softirq, idle ticks) and /proc/PID/stat of every process under the run (utime,
stime), twice. Prints one JSON line: per step, in core-milliseconds, the ranks' user and
system time, the machine's busy time in all and its softirq share, the idle time; the wall
time per step over the window, and the summary's median step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradsync.bench.procstat import descendants, machine_cpu_s, process_cpu_s


def tree(root: int) -> dict[int, tuple[float, float]]:
    """(user, system) seconds of ``root`` and every process under it, by pid."""
    out = {}
    for pid in descendants(root):
        try:
            out[pid] = process_cpu_s(pid)
        except OSError:
            continue  # exited since the listing
    return out


def steps_done(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except OSError:
        return 0


def snapshot(root: int, metrics: Path) -> dict:
    return {"t": time.monotonic(), "step": steps_done(metrics), "machine": machine_cpu_s(),
            "ranks": tree(root)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("train", nargs=argparse.REMAINDER, help="-- then gradsync train's flags")
    args = ap.parse_args()
    flags = [a for a in args.train if a != "--"]
    with tempfile.TemporaryDirectory(prefix="plan-cpu-") as out:
        metrics = Path(out) / "metrics.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", *flags, "--steps",
                                 str(args.steps), "--no-progress", "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        marks, taken = [], []
        for frac in (0.3, 0.9):
            while steps_done(metrics) < frac * args.steps and proc.poll() is None:
                time.sleep(0.02)  # polling the run from outside it, not a test's wait
            taken.append(snapshot(proc.pid, metrics))
        _, err = proc.communicate()
        if proc.returncode != 0 or len(taken) < 2:
            print(err[-2000:], file=sys.stderr)
            return 1
        a, b = taken
        n = b["step"] - a["step"]
        ranks = [p for p in b["ranks"] if p in a["ranks"]]
        user = sum(b["ranks"][p][0] - a["ranks"][p][0] for p in ranks)
        system = sum(b["ranks"][p][1] - a["ranks"][p][1] for p in ranks)
        d = {k: b["machine"][k] - a["machine"][k] for k in a["machine"]}
        busy = sum(v for k, v in d.items() if k not in ("idle", "iowait"))
        summary = json.loads((Path(out) / "summary.json").read_text())
        ms = 1e3 / max(n, 1)
        marks = {"steps_in_window": n, "wall_ms": (b["t"] - a["t"]) * ms,
                 "ranks_user_ms": user * ms, "ranks_system_ms": system * ms,
                 "machine_busy_ms": busy * ms, "machine_softirq_ms": d["softirq"] * ms,
                 "machine_system_ms": d["system"] * ms, "machine_user_ms": d["user"] * ms,
                 "idle_ms": (d["idle"] + d["iowait"]) * ms, "cores": os.cpu_count(),
                 "median_step_ms": summary["step_time_ms_median"],
                 "bytes_per_step_per_worker": summary.get("bytes_per_step_per_worker"),
                 "flags": flags}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in marks.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
