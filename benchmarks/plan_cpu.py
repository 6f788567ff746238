"""Where a lab run's CPU goes, per step: the ranks' own user and system time, the kernel's
interrupt work, and what stays idle (issue 25: the planner's CPU budget on shared cores).

    flock -x /tmp/gradsync-bench.lock .venv/bin/python benchmarks/plan_cpu.py \\
        --steps 300 -- --workload digits-mlp --lab 5 --rate 1gbit --algorithm ring

Runs `gradsync train ARGS --steps N` and accounts its CPU over steps 30 % .. 90 %
(gradsync/plan/cpuwindow.py, which `gradsync plan --lab --calibrate` reads the machine's
constants from). Prints one JSON line: per step, in core-milliseconds, the ranks' user and
system time, the machine's busy time in all and its softirq share, the idle time; the wall
time per step over the window, and the summary's median step.
"""

from __future__ import annotations

import argparse
import json
import sys

from gradsync.plan.cpuwindow import run_accounted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("train", nargs=argparse.REMAINDER, help="-- then gradsync train's flags")
    args = ap.parse_args()
    flags = [a for a in args.train if a != "--"]
    try:
        got = run_accounted(flags, args.steps)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    ms = {f"{k}_ms": round(1e3 * v, 3) for k, v in got.items()
          if k not in ("steps", "cores", "bytes_per_step_per_worker")}
    print(json.dumps({"steps_in_window": got["steps"], **ms, "cores": got["cores"],
                      "bytes_per_step_per_worker": got["bytes_per_step_per_worker"],
                      "flags": flags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
