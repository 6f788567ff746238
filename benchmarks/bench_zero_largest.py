"""The largest model each variant (DataParallel, ZeRO stages 1-3) trains under a memory limit.

For each variant, launches of bench_zero_memory.py (``--steps`` steps of float32 Adam on an
MLP 784-H-...-H-10, ``--workers`` ranks, all in one memory cgroup of ``--limit-mib``)
search the largest ``--layers`` that completes: doubling from ``--start`` until a launch
fails (the kernel's OOM killer), then bisecting; once two sizes have trained, the next
guess is where the line through their job peaks meets the limit. A launch that fails for
another reason than memory fails the same way at every size, so the report prints each
variant's first failure. Needs root (the cgroup). Run from the repository root, alone::

    flock -x /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero_largest \\
        --limit-mib 3000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import command, describe_machine, machine, write_json
from benchmarks.bench_zero import PEER, VARIANTS
from benchmarks.bench_zero_memory import MIB, _launch_one, allocator, check_args

MODULE = "benchmarks.bench_zero_largest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--limit-mib", type=int, required=True,
                   help="memory limit of each launch (all its ranks together)")
    p.add_argument("--workers", type=int, default=4, help="ranks")
    p.add_argument("--hidden", type=int, default=2048, help="hidden width")
    p.add_argument("--start", type=int, default=4, help="first --layers tried")
    p.add_argument("--max-layers", type=int, default=64, help="stop searching above this")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=2, help="steps per launch")
    p.add_argument("--variants", default=",".join(VARIANTS + (PEER,)),
                   help="comma-separated; fsdp2: torch's fully_shard (bench_zero_fsdp.py)")
    p.add_argument("--glibc-dynamic", action="store_true",
                   help="leave glibc's dynamic mmap threshold on (bench_zero_memory.py)")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    args = p.parse_args(argv)
    check_args(p, args, ("limit_mib", "workers", "hidden", "start", "max_layers", "batch",
                         "steps"))
    return args


def mlp_params(hidden: int, layers: int) -> int:
    """Parameters of MLP 784-hidden x layers-10 (weights and biases)."""
    return 785 * hidden + (layers - 1) * (hidden + 1) * hidden + (hidden + 1) * 10


def _next_size(ok: dict[int, int], lo: int, hi: int | None, limit: int) -> int:
    """The next --layers to try, strictly between ``lo`` (trained) and ``hi`` (failed)."""
    if len(ok) >= 2:  # where the line through the two largest that trained meets the limit
        (l1, p1), (l2, p2) = sorted(ok.items())[-2:]
        if p2 > p1:
            guess = l2 + int((limit - p2) * (l2 - l1) / (p2 - p1))
            return max(lo + 1, min(guess, hi - 1 if hi is not None else guess))
    return 2 * lo if hi is None else (lo + hi) // 2


def largest(args: argparse.Namespace, variant: str) -> dict:
    """Search one variant's largest --layers under the limit; its launches' outcomes."""
    tried, ok = [], {}  # ok: layers -> job peak bytes
    lo, hi, size = 0, None, args.start
    while hi is None or hi - lo > 1:
        argv = ["--workers", str(args.workers), "--hidden", str(args.hidden),
                "--layers", str(size), "--batch", str(args.batch), "--steps", str(args.steps),
                "--limit-mib", str(args.limit_mib), "--variants", variant]
        argv += ["--glibc-dynamic"] if args.glibc_dynamic else []
        r = _launch_one(args, argv, variant)
        tried.append({"layers": size, "ok": r["ok"], "job_peak": r["job_peak"],
                      "error": r.get("error", "")})
        print(f"#   {variant:<7} layers {size:3d}: "
              f"{'trained' if r['ok'] else 'FAILED ' + r['error'][:60]}, "
              f"job peak {r['job_peak'] / MIB:.0f} MiB", flush=True)
        if r["ok"]:
            lo, ok[size] = size, r["job_peak"]
            if size >= args.max_layers:
                break
        else:
            hi = size
        if hi is not None and hi - lo <= 1:
            break
        size = min(_next_size(ok, lo, hi, args.limit_mib * MIB), args.max_layers)
    return {"variant": variant, "largest_layers": lo, "tried": tried,
            "params": mlp_params(args.hidden, lo) if lo else 0,
            "job_peak": ok.get(lo, 0)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd, mach = command(MODULE, argv), machine()
    print(f"# largest MLP 784-{args.hidden}xL-10 that trains {args.steps} steps of float32 "
          f"Adam, {args.workers} ranks, batch {args.batch}/rank, under {args.limit_mib} MiB "
          f"for the whole job (cgroup)")
    print(f"# machine: {describe_machine(mach)}\n# command: {cmd}\n# allocator: "
          f"{allocator(args)}")
    results = [largest(args, v) for v in args.variants.split(",")]
    print(f"  {'variant':<8} {'layers':>6} {'M params':>8} {'job peak MiB':>12}  first failure")
    for r in results:
        fail = min((t["layers"] for t in r["tried"] if not t["ok"]), default=None)
        why = f"layers {fail}" if fail is not None else f"none up to {args.max_layers}"
        print(f"  {r['variant']:<8} {r['largest_layers']:6d} {r['params'] / 1e6:8.1f} "
              f"{r['job_peak'] / MIB:12.0f}  {why}")
    if args.json:
        write_json(args.json, {"benchmark": "zero-largest", "command": cmd, "machine": mach,
                               "limit_mib": args.limit_mib, "allocator": allocator(args),
                               "results": results})


if __name__ == "__main__":
    main()
