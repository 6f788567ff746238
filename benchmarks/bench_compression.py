"""Time to accuracy with gradient compression, against torch DDP with and without its own
PowerSGD hook, measured in one run.

    python -m benchmarks.bench_compression --lab-rate 100mbit          # 3 lab hosts (root)
    python -m benchmarks.bench_compression                             # 3 local workers
    python -m benchmarks.bench_compression --configs ddp,torch-powersgd:R,powersgd:R --rounds 1
    python -m benchmarks.bench_compression --lab-rate 100mbit --rounds 1 --configs ddp,torch-powersgd:R,powersgd:R,powersgd-bf16-warmup:R

Every configuration is a real ``gradsync train`` of the same workload, seed and global
batch (digits-wide: 1.1 M parameters, 4.4 MB of gradients per step, so the network can set
the pace). Bytes alone say little (Agarwal et al., MLSys 2022): the figure is the training
time until the training loss, averaged over the last ``--window`` steps, first reaches
``--target-loss``, and the test accuracy at the end. Rounds interleave the configurations so
a noisy neighbour slows all of them alike; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import describe_machine, machine

# label -> gradsync train flags; "ddp" and "torch-" rows are torch's DDP, the latter with
# torch's own hook; R is --rank.
CONFIGS = {
    "ddp": ["--arch", "ddp"],
    "torch-powersgd:R": ["--arch", "ddp", "--compression", "powersgd:{rank}"],
    "allreduce": ["--arch", "allreduce"],
    "fp16": ["--arch", "allreduce", "--compression", "fp16"],
    "bf16": ["--arch", "allreduce", "--compression", "bf16"],
    "topk:0.01": ["--arch", "allreduce", "--compression", "topk:0.01"],
    "powersgd:R": ["--arch", "allreduce", "--compression", "powersgd:{rank}"],
    # The same, its warm-up steps' all-reduces in bf16 (torch's hook sends them in float32).
    "powersgd-bf16-warmup:R": ["--arch", "allreduce", "--compression", "powersgd:{rank}",
                               "--warmup-compression", "bf16"],
}


def run(label: str, args, out: Path) -> dict:
    flags = [f.format(rank=args.rank) for f in CONFIGS[label]]
    cmd = [sys.executable, "-m", "gradsync", "train", "--workload", args.workload,
           "--hidden", str(args.hidden), "--epochs", str(args.epochs), "--seed", "0",
           "--no-progress", "--out", str(out), *flags]
    if "--compression" in flags:
        cmd += ["--compression-warmup", str(args.warmup)]
    cmd += (["--lab", str(args.workers), "--rate", args.lab_rate] if args.lab_rate
            else ["--workers", str(args.workers)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_compression: {label} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, **time_to_target(steps, args.target_loss, args.window)}


def time_to_target(steps: list[dict], target: float, window: int) -> dict:
    """Training seconds (the sum of step times) and steps until the mean loss of the last
    ``window`` steps first reaches ``target``; None if it never does."""
    elapsed, losses = 0.0, []
    for record in steps:
        elapsed += record["step_time_s"]
        losses.append(record["loss"])
        if len(losses) >= window and statistics.fmean(losses[-window:]) <= target:
            return {"to_target_s": elapsed, "to_target_steps": len(losses)}
    return {"to_target_s": None, "to_target_steps": None}


def report(results: dict[str, list[dict]], args) -> list[dict]:
    rows = []
    base = _median([r["to_target_s"] for r in results.get("ddp", [])])
    for label, runs in results.items():
        s = [r["summary"] for r in runs]
        steps_run = statistics.median(x["steps_run"] for x in s)
        to_target = _median([r["to_target_s"] for r in runs])
        rows.append({
            "config": label.replace(":R", f":{args.rank}"),
            "to_target_s": to_target,
            "to_target_steps": _median([r["to_target_steps"] for r in runs]),
            "vs_ddp": base / to_target if base and to_target else None,
            "eval_accuracy": statistics.median(x["eval_accuracy"] for x in s),
            "step_ms": statistics.median(x["step_time_ms_median"] for x in s),
            "comm_ms": statistics.median(1e3 * x["comm_wait_s"] / steps_run for x in s),
            "compress_ms": statistics.median(1e3 * x.get("compress_s", 0.0) / steps_run
                                             for x in s),
            "mb_per_step": _median([x["bytes_per_step_per_worker"] and
                                    x["bytes_per_step_per_worker"] / 1e6 for x in s]),
            "ratio": statistics.median(x.get("compression_ratio", 1.0) for x in s),
        })
    print(f"# {'config':<26} {'to loss':>8} {'steps':>6} {'vs ddp':>7} {'accuracy':>9} "
          f"{'step ms':>8} {'comm ms':>8} {'compr ms':>9} {'MB/step':>8} {'ratio':>6}")
    for r in rows:
        print(f"  {r['config']:<26} {_fmt(r['to_target_s'], '.2f', 's'):>8} "
              f"{_fmt(r['to_target_steps'], '.0f'):>6} {_fmt(r['vs_ddp'], '.2f', 'x'):>7} "
              f"{100 * r['eval_accuracy']:>8.2f}% {r['step_ms']:>8.1f} {r['comm_ms']:>8.1f} "
              f"{r['compress_ms']:>9.2f} {_fmt(r['mb_per_step'], '.3f'):>8} {r['ratio']:>6.1f}")
    return rows


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--workload", default="digits-wide")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank, both implementations")
    p.add_argument("--warmup", type=int, default=10,
                   help="steps sent uncompressed first (torch's PowerSGD: start_iter)")
    p.add_argument("--target-loss", type=float, default=0.15)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lab-rate", metavar="RATE", help="run in a lab of --workers hosts")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    labels = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in labels if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    print(f"# python -m benchmarks.bench_compression {' '.join(argv or sys.argv[1:])}")
    print(f"# {describe_machine(machine())}")
    print(f"# {args.workload} (hidden {args.hidden}), {args.workers} workers x batch 32, "
          f"{args.epochs} epochs, " + (f"lab links {args.lab_rate}" if args.lab_rate
                                       else "local loopback")
          + f"; target: mean loss of {args.window} steps <= {args.target_loss}")
    results: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        for r in range(args.rounds):
            for i, label in enumerate(labels):
                results[label].append(run(label, args, Path(tmp) / f"{r}-{i}"))
                last = results[label][-1]
                print(f"# round {r + 1}: {label}: to target {_fmt(last['to_target_s'], '.2f')} s,"
                      f" accuracy {100 * last['summary']['eval_accuracy']:.2f} %",
                      file=sys.stderr, flush=True)
    rows = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
