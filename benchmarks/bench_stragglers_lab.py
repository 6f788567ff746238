"""Stragglers named in the lab (issue 27): one host's CPU capped, its rank named within 20 steps.

    python -m benchmarks.bench_stragglers_lab --cap 0.33 --batch-size 256   # 3 hosts
    python -m benchmarks.bench_stragglers_lab --hosts 2 --cap 0.5 --batch-size 256

Each trial brings up a lab of ``--hosts`` hosts at 1 Gbit (root, gradsync/lab/cpu.py's
cgroups), the last one capped at ``--cap`` cores (``gradsync lab up --cpus max,max,0.33``)
or none capped, and runs ``gradsync train --straggler-window 20`` across it, one worker per
host. On 2 cores 3 hosts get 0.67 cores each, so half a host's share is 0.33; 2 hosts get
one core each. It reports, per trial, the workers that rank 0's warnings named and in which
window, and summary.json's stragglers. The check passes when every capped trial names the
capped host's worker (and only it) in its first window, steps 1-20, and no uncapped trial
names anyone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from gradsync.bench.report import machine_line
from gradsync.lab.cluster import up
from gradsync.lab.run import lab_launch

WARNING = re.compile(r"straggler: worker (\d+) computed ([\d.]+)x the median of the workers "
                     r"in steps (\d+)-(\d+)")


def trial(cap: float | None, args: argparse.Namespace, port: int) -> dict:
    """One run; the warnings' (worker, factor, first step, last step) and the summary's."""
    out = Path(tempfile.mkdtemp(prefix="gradsync-stragglers-"))
    lines: list[str] = []
    last = args.hosts - 1
    cpus = ",".join(["max"] * last + [str(cap)]) if cap else None
    try:
        with up(args.hosts, "1gbit", cpus=cpus, name=f"strag-{os.getpid()}-{port}") as lab:
            rc = lab_launch(lab, ["train", "--workload", args.workload, "--steps",
                                  str(args.steps), "--batch-size", str(args.batch_size), "--straggler-window", "20", "--no-progress",
                                  "--no-plots", "--out", str(out)],
                            master_port=port, timeout_s=300,
                            on_line=lambda rank, _, line: lines.append(f"[{rank}] {line}"))
        summary = json.loads((out / "summary.json").read_text()) if rc == 0 else {}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    named = [(int(w), float(f), int(a), int(b)) for line in lines
             for w, f, a, b in WARNING.findall(line)]
    return {"cap": cap, "rc": rc, "named": named, "stragglers": summary.get("stragglers"),
            "compute_s": summary.get("compute_s_per_worker"),
            "step_ms": summary.get("step_time_ms_median")}


def passed(result: dict, capped_worker: int) -> bool:
    if result["rc"] != 0:
        return False
    if result["cap"] is None:
        return not result["named"] and not result["stragglers"]
    first = [w for w, _, a, _ in result["named"] if a == 1]
    return first == [capped_worker] and {w for w, *_ in result["named"]} == {capped_worker}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="runs capped, and as many uncapped")
    p.add_argument("--cap", type=float, default=0.5, help="host 2's cores (default 0.5)")
    p.add_argument("--workload", default="digits-cnn")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--hosts", type=int, default=3, help="lab hosts, one worker each; the last "
                   "is capped")
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    args = p.parse_args()
    print(f"# {machine_line()}")
    print(f"# {' '.join([os.path.basename(sys.executable), '-m', __spec__.name, *sys.argv[1:]])}")
    ok = True
    for i, cap in enumerate([args.cap] * args.trials + [None] * args.trials):
        r = trial(cap, args, 29620 + i)
        ok &= passed(r, args.hosts - 1)
        named = "; ".join(f"worker {w} at {f:.2f}x in steps {a}-{b}" for w, f, a, b in r["named"])
        print(f"{f'host {args.hosts - 1} at ' + format(cap, 'g') + ' cpus' if cap else 'none capped':<18} "
              f"rc {r['rc']}  median step {r['step_ms'] or 0:.1f} ms  warnings: "
              f"{named or 'none'}  summary: {r['stragglers']}  compute s/worker: "
              f"{[round(c, 2) for c in r['compute_s'] or []]}  "
              f"{'PASS' if passed(r, args.hosts - 1) else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
