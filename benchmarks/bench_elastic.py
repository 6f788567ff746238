"""Recovery time of elastic training: from a worker's SIGKILL to the next completed step.

    python -m benchmarks.bench_elastic                 # 20 trials, 4 workers, digits-mlp
    python -m benchmarks.bench_elastic --trials 30 --workers 3 --timeout 60

One `gradsync train --elastic --max-restarts TRIALS` run. Each trial waits until the run is
back to its full worker count (the replacement of the previous victim has joined) and has
completed a few steps more, sleeps a random 0.2 to 1.0 s, SIGKILLs a random worker (rank 0
included; its pid found by the GRADSYNC_ELASTIC_UID in its environment), and reads
metrics.jsonl until a step of a newer generation completes: its wall-clock time minus the
kill's is the recovery time. The replacement's own start (importing torch, building the
model) is reported apart, as the time from the kill to the step that completes with the
full count again. Default timeouts (--timeout 300, the heartbeat period is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]]  # the last line may be half-written


def workers_by_uid(marker: str) -> dict[int, int]:
    """uid -> pid of the live workers of this run (their environment carries ``marker``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if marker.encode() not in env:
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        for item in env:
            if item.startswith(b"GRADSYNC_ELASTIC_UID="):
                found[int(item.split(b"=")[1])] = int(proc.name)
    return found


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--workload", default="digits-mlp")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    marker = f"GRADSYNC_BENCH_MARK={uuid.uuid4().hex}"
    out = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    metrics = out / "metrics.jsonl"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    cmd = [sys.executable, "-m", "gradsync", "train", "--elastic", "--no-progress",
           "--workload", args.workload, "--workers", str(args.workers), "--min-workers", "1",
           "--max-restarts", str(args.trials), "--steps", "10000000", "--timeout",
           str(args.timeout), "--out", str(out)]
    print("command:", " ".join(cmd[1:]), flush=True)
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    recover, rejoin = [], []
    try:
        for trial in range(args.trials):
            # Back to full strength, and a few steps done since.
            full = wait_for(lambda: [r for r in records(metrics)
                                     if r["workers"] == args.workers], 120, "full count")
            gen, step = full[-1]["generation"], full[-1]["step"]
            wait_for(lambda: any(r["step"] >= step + 5 for r in records(metrics)), 60, "steps")
            time.sleep(rng.uniform(0.2, 1.0))
            live = workers_by_uid(marker)
            uid = rng.choice(sorted(live))
            gen = records(metrics)[-1]["generation"]
            killed_at = time.time()
            os.kill(live[uid], signal.SIGKILL)
            after = wait_for(lambda: [r for r in records(metrics) if r["generation"] > gen],
                             120, "recovery")
            recover.append(after[0]["time"] - killed_at)
            back = wait_for(lambda: [r for r in records(metrics) if r["generation"] > gen
                                     and r["workers"] == args.workers], 180, "the replacement")
            rejoin.append(back[0]["time"] - killed_at)
            print(f"trial {trial + 1}: killed member {uid} at step {after[0]['step'] - 1}: "
                  f"next step after {recover[-1]:.2f} s, full count again after "
                  f"{rejoin[-1]:.2f} s", flush=True)
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    left = workers_by_uid(marker)
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.workload}, {args.workers} workers, {args.trials} trials")
    for name, xs in (("kill -> next completed step", recover),
                     ("kill -> step with the replacement", rejoin)):
        print(f"{name}: median {statistics.median(xs):.2f} s, min {min(xs):.2f} s, "
              f"max {max(xs):.2f} s")
    print(f"processes left: {len(left)}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
