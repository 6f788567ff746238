"""Each rank's CPU per step in its compressor's hook and in all, inside a real run (issue
25: what a compressor costs on shared cores, against the planner's profile).

    flock -x /tmp/gradsync-bench.lock .venv/bin/python benchmarks/plan_hook_cpu.py \\
        --buckets 2 -- --workload digits-wide --lab 4 --rate 200mbit --arch allreduce \\
        --compression powersgd:2 --steps 150

Runs `gradsync train ARGS --out DIR` with a `sitecustomize` on PYTHONPATH that wraps
gradsync's `make_hook` in every rank: after ``--skip`` hook calls it adds up the rank's
main-thread CPU (``time.thread_time``) and wall time in the hook's calls and in its
handles' waits, and the thread's CPU and wall time since, and writes them to a file every
20 calls. Prints one JSON line per rank, per step (hook calls / ``--buckets``), in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SITE = '''
import json, os, time
import gradsync.compress.spec as _spec
from gradsync import comm as _comm
_make, _out, _skip = _spec.make_hook, os.environ["PLAN_HOOK_CPU_OUT"], int(os.environ["PLAN_HOOK_CPU_SKIP"])
_acc = dict(calls=0, call_cpu=0.0, wait_cpu=0.0, call_wall=0.0, wait_wall=0.0)

def _dump():
    _acc.update(cpu1=time.thread_time(), t1=time.perf_counter())
    with open(os.path.join(_out, f"{os.getpid()}.json"), "w") as f:
        json.dump(_acc, f)

def make_hook(*args, **kwargs):
    made = _make(*args, **kwargs)
    if made is None:
        return made
    state, hook = made

    def timed(st, bucket):
        _acc["calls"] += 1
        on = _acc["calls"] > _skip
        if _acc["calls"] == _skip + 1:
            _acc.update(cpu0=time.thread_time(), t0=time.perf_counter())
        c, w = time.thread_time(), time.perf_counter()
        handle = hook(st, bucket)
        if on:
            _acc["call_cpu"] += time.thread_time() - c
            _acc["call_wall"] += time.perf_counter() - w

        def finish():
            c, w = time.thread_time(), time.perf_counter()
            result = handle.wait()
            if on:
                _acc["wait_cpu"] += time.thread_time() - c
                _acc["wait_wall"] += time.perf_counter() - w
            return result
        if on and _acc["calls"] % 20 == 0:
            _dump()
        return _comm.Work(finish)
    return state, timed

_spec.make_hook = make_hook
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buckets", type=int, required=True, help="hook calls per step")
    ap.add_argument("--skip", type=int, default=60, help="hook calls left out first")
    ap.add_argument("train", nargs=argparse.REMAINDER, help="-- then gradsync train's flags")
    args = ap.parse_args()
    flags = [a for a in args.train if a != "--"]
    with tempfile.TemporaryDirectory(prefix="plan-hook-cpu-") as tmp:
        site, out, run = (Path(tmp) / name for name in ("site", "out", "run"))
        site.mkdir()
        out.mkdir()
        (site / "sitecustomize.py").write_text(SITE)
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PLAN_HOOK_CPU_OUT": str(out),
               "PLAN_HOOK_CPU_SKIP": str(args.skip)}
        proc = subprocess.run([sys.executable, "-m", "gradsync", "train", *flags,
                               "--no-progress", "--out", str(run)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        median = json.loads((run / "summary.json").read_text())["step_time_ms_median"]
        for f in sorted(out.glob("*.json")):
            a = json.loads(f.read_text())
            steps = (a["calls"] - args.skip) / args.buckets
            per = {k: round(1e3 * v / steps, 3) for k, v in (
                ("hook_call_cpu_ms", a["call_cpu"]), ("hook_wait_cpu_ms", a["wait_cpu"]),
                ("hook_call_wall_ms", a["call_wall"]), ("hook_wait_wall_ms", a["wait_wall"]),
                ("thread_cpu_ms", a["cpu1"] - a["cpu0"]), ("wall_ms", a["t1"] - a["t0"]))}
            print(json.dumps({"pid": int(f.stem), "steps": round(steps), **per,
                              "median_step_ms": median, "flags": flags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
