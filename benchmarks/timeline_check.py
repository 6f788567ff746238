"""The lab timeline check of issue 27: a 3-host run's --timeline against its own summary.

    python -m benchmarks.timeline_check                       # lab run, kill run, checks
    python -m benchmarks.timeline_check --trace T --out DIR   # only the checks, on files

A lab of 3 hosts at 1 Gbit (root) runs ``gradsync train --timeline`` twice:

1. to the end: the merged file must ``json.load``; per rank and step, the spans on the
   compute row (forward + backward + optimizer step) must account for the ``step`` span
   within 5 %, and rank 0's ``step`` span must be the step time metrics.jsonl reports
   (within 5 %); every bucket's ``all-reduce`` span must name the algorithm the summary's
   ``bucket_algorithms`` gives that bucket, one per rank, step and bucket;
2. killed midway: once 10 steps are in metrics.jsonl every process of host 1 gets SIGKILL
   (the others are then stopped by the launcher); each rank's file must still ``json.load``.

It prints the share of steps within 5 %, the median coverage, and the worst step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from gradsync.bench.report import machine_line
from gradsync.lab import netns
from gradsync.lab.cluster import up
from gradsync.lab.run import lab_launch
from gradsync.observe import load, rank_path

TOLERANCE = 0.05
PARTS = ("forward", "backward", "optimizer step")


def accounting(events: list[dict], metrics: list[dict]) -> dict:
    """Per (rank, step): the parts' sum over the step span; rank 0's step span against
    metrics.jsonl's step time."""
    spans: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for e in events:
        if e.get("ph") == "X" and e.get("tid") == 0:
            spans[(e["pid"], e["args"]["step"])][e["name"]] = e["dur"]
    coverage = {k: sum(s.get(p, 0.0) for p in PARTS) / s["step"] for k, s in spans.items()
                if s.get("step")}
    measured = {m["step"]: 1e6 * m["step_time_s"] for m in metrics}
    rank0 = [spans[(0, n)]["step"] / us for n, us in measured.items() if (0, n) in spans]
    within = [c for c in coverage.values() if abs(1 - c) <= TOLERANCE]
    worst = min(coverage.items(), key=lambda kv: kv[1]) if coverage else None
    return {"steps": len(coverage), "within_5pct": len(within),
            "median_coverage": statistics.median(coverage.values()) if coverage else 0.0,
            "worst": worst, "rank0_step_vs_metrics": (min(rank0), max(rank0)) if rank0 else None}


def buckets(events: list[dict], summary: dict) -> dict:
    """The bucket spans against the summary's algorithm per bucket."""
    chosen = summary.get("bucket_algorithms") or []
    spans = [e for e in events if e.get("name") == "all-reduce"]
    wrong = [e for e in spans if chosen[e["args"]["bucket"]] != e["args"]["algorithm"]]
    ranks, steps = summary["workers"], summary["steps_run"]
    return {"spans": len(spans), "expected": ranks * steps * len(chosen), "mismatched": len(wrong),
            "algorithms": chosen}


def check_files(trace: Path, out: Path) -> bool:
    events = load(trace)  # json.load: raises when the file does not parse
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    summary = json.loads((out / "summary.json").read_text())
    acc, bk = accounting(events, metrics), buckets(events, summary)
    print(f"parsed {trace}: {len(events)} events, {summary['workers']} ranks, "
          f"{summary['steps_run']} steps, median step {summary['step_time_ms_median']:.1f} ms")
    print(f"steps whose forward+backward+optimizer spans are within 5 % of the step span: "
          f"{acc['within_5pct']}/{acc['steps']} (median coverage "
          f"{100 * acc['median_coverage']:.1f} %, worst {acc['worst'][0]} at "
          f"{100 * acc['worst'][1]:.1f} %)")
    lo, hi = acc["rank0_step_vs_metrics"]
    print(f"rank 0's step span / metrics.jsonl step time: {lo:.4f} - {hi:.4f}")
    print(f"bucket spans: {bk['spans']} of {bk['expected']} expected, {bk['mismatched']} with "
          f"another algorithm than the summary's {bk['algorithms']}")
    return (acc["within_5pct"] == acc["steps"] and abs(lo - 1) <= TOLERANCE
            and abs(hi - 1) <= TOLERANCE and bk["mismatched"] == 0
            and bk["spans"] == bk["expected"])


def lab_run(root: Path, argv: list[str], kill_host: int | None, port: int) -> int:
    """``gradsync train ARGV --timeline root/trace.json --out root/out`` on 3 lab hosts; with
    ``kill_host``, SIGKILL that host's processes once 10 steps are recorded."""
    args = ["train", *argv, "--timeline", str(root / "trace.json"), "--out", str(root / "out"),
            "--no-progress", "--no-plots"]
    with up(3, "1gbit", name=f"tlc-{os.getpid()}-{port}") as lab:
        result: dict[str, int] = {}
        runner = threading.Thread(target=lambda: result.setdefault(
            "rc", lab_launch(lab, args, master_port=port, timeout_s=300,
                             on_line=lambda *a: None)))
        runner.start()
        if kill_host is not None:
            metrics = root / "out" / "metrics.jsonl"
            while runner.is_alive() and not (metrics.exists()
                                             and len(metrics.read_text().splitlines()) >= 10):
                time.sleep(0.05)
            for pid in netns.netns_pids(lab.hosts[kill_host].ns):
                os.kill(pid, signal.SIGKILL)
            print(f"killed host {kill_host} at step "
                  f"{len(metrics.read_text().splitlines())}", flush=True)
        runner.join()
    return result["rc"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, help="check this merged trace (with --out) only")
    p.add_argument("--out", type=Path, help="the run's --out directory")
    p.add_argument("--workload", default="digits-cnn")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bucket-cap-mb", default="0.05")
    p.add_argument("--keep", type=Path, help="copy the finished run's files here")
    args = p.parse_args()
    if args.trace:
        return 0 if check_files(args.trace, args.out) else 1
    print(f"# {machine_line()}")
    train = ["--workload", args.workload, "--steps", str(args.steps), "--bucket-cap-mb",
             args.bucket_cap_mb]
    root = Path(tempfile.mkdtemp(prefix="gradsync-timeline-"))
    try:
        rc = lab_run(root / "full", train, None, 29650)
        print(f"full run: exit {rc}")
        ok = rc == 0 and check_files(root / "full/trace.json", root / "full/out")
        if args.keep:
            shutil.copytree(root / "full", args.keep, dirs_exist_ok=True)
        rc = lab_run(root / "kill", [*train[:3], "400", *train[4:]], 1, 29651)
        for r in range(3):
            events = load(rank_path(root / "kill/trace.json", r))
            steps = {e["args"]["step"] for e in events if e.get("name") == "step"}
            print(f"killed run (exit {rc}): rank {r}'s file parses, {len(events)} events, "
                  f"steps {min(steps, default=0)}-{max(steps, default=0)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
