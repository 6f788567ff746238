"""Where a lab run's CPU goes: per rank (user + system of every process that has RANK in its
environment, children included), the whole machine's kernel time (system + softirq, which
holds the emulated network's veth/bridge/tbf work), and wall time, for a command.

Run the same command twice with different --steps and take the difference, so start-up
(imports, the lab, the first pull) cancels out:

    python -m benchmarks.ps_cpu --steps 20,60 -- gradsync train --workload synthetic-mlp \
        --hidden 1024 --batch-size 64 --arch ps --servers 3 --workers 3 --lab 6 \
        --rate 200mbit --no-progress

prints, per extra step: each rank's CPU ms, the sum, the machine's kernel ms, and the wall
ms x the cores (what the machine had). Issue 29 (docs/benchmarks.md section 13).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from gradsync.bench.procstat import descendants, machine_cpu_s, process_cpu_s


def _rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


def _machine_s() -> tuple[float, float]:
    """The machine's (user + nice, system + irq + softirq) seconds, all cores."""
    cpu = machine_cpu_s()
    return cpu["user"] + cpu["nice"], cpu["system"] + cpu["irq"] + cpu["softirq"]


def measure(argv: list[str]) -> tuple[dict[str, list[float]], list[float], float]:
    """Run ``argv``; return per rank [user, system] CPU seconds (the last sample of each
    process), the machine's [user, kernel] seconds and the wall seconds."""
    m0, t0 = _machine_s(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    last: dict[int, tuple[str, tuple[float, float]]] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                rank = last[pid][0] if pid in last else _rank(pid)
                if rank is not None:
                    last[pid] = (rank, process_cpu_s(pid))
            except OSError:
                pass  # exited between the listing and the read
        time.sleep(0.05)
    per_rank: dict[str, list[float]] = {}
    for rank, (user, system) in last.values():
        acc = per_rank.setdefault(rank, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + user, acc[1] + system
    if proc.returncode:
        raise SystemExit(f"{argv} failed with {proc.returncode}")
    m1 = _machine_s()
    return per_rank, [m1[0] - m0[0], m1[1] - m0[1]], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="20,60", help="two step counts")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.command if a != "--"]
    a, b = (int(s) for s in args.steps.split(","))
    ra, ka, wa = measure(argv + ["--steps", str(a)])
    rb, kb, wb = measure(argv + ["--steps", str(b)])
    per = 1e3 / (b - a)  # ms per extra step
    print(f"# ms per step, from {a} and {b} steps ({os.cpu_count()} cores); the last sample "
          "of a rank may miss up to 50 ms of its CPU")
    total = [0.0, 0.0]
    for rank in sorted(rb, key=int):
        d = [per * (x - y) for x, y in zip(rb[rank], ra.get(rank, [0.0, 0.0]))]
        total = [total[0] + d[0], total[1] + d[1]]
        print(f"rank {rank:>2}: user {d[0]:7.1f}  sys {d[1]:7.1f}")
    wall = per * (wb - wa)
    print(f"all ranks: user {total[0]:7.1f}  sys {total[1]:7.1f}  = {sum(total):7.1f}")
    print(f"machine (all processes): user {per * (kb[0] - ka[0]):7.1f}  sys+irq+softirq "
          f"{per * (kb[1] - ka[1]):7.1f}; wall {wall:7.1f} x {os.cpu_count()} cores = "
          f"{wall * os.cpu_count():7.1f}")


if __name__ == "__main__":
    main()
