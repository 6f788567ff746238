"""`gradsync bench memory`: peak memory per rank of DataParallel and ZeRO stages 1-3 against
ZeRO's formulas, and the largest model each trains under a memory limit.

    gradsync bench memory                                  # 4 ranks, MLP 784-2048x13-10 (52 M)
    gradsync bench memory --fsdp2 --limit-mib 16000        # torch's FSDP2 too; job peaks
    gradsync bench memory --largest --limit-mib 3000       # largest MLP per variant (root)

Each variant runs in a launch of its own (fresh processes, so the peak is its own):
``--workers`` ranks train the MLP 784-H-...-H-10 for ``--steps`` steps of float32 Adam
(gradsync/bench/memory_rank.py). Per variant the table gives, for the largest rank, the
model state against ZeRO's float32-Adam formulas (DataParallel 16, stage 1 8 + 8/N, stage 2
4 + 12/N, stage 3 16/N bytes per parameter) and the process's peak above its start.

``--limit-mib M`` runs each launch (launcher and ranks) in a memory cgroup of M MiB (root);
a launch that needs more is killed by the OOM killer, and the table adds the job's peak.
``--largest`` searches, per variant, the largest ``--layers`` that trains under the limit:
doubling from ``--start`` until a launch fails, then bisecting, guessing from the line
through the two largest job peaks once two sizes have trained.

The ranks keep glibc's malloc defaults (what a user gets); ``--fixed-mmap-threshold`` runs
them with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's default threshold, held fixed), which
returns every large freed block to the system at a cost in speed (docs/benchmarks.md 17).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..exits import UserError
from ..flags import add_dataclass_arguments, at_least, config_from_args, flag_meta, to_argv
from .memory_rank import PEER, VARIANTS
from ..exits import under_launcher
from .ranks import usage
from .report import machine_line

MIB = 1 << 20
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc's default, fixed


@dataclass
class MemoryBenchConfig:
    """What `gradsync bench memory` measures."""

    workers: int = field(default=4, metadata=flag_meta("ranks"))
    hidden: int = field(default=2048, metadata=flag_meta("hidden width of the MLP"))
    layers: int = field(default=13, metadata=flag_meta("hidden layers of the MLP"))
    batch: int = field(default=32, metadata=flag_meta("samples per rank per step"))
    steps: int = field(default=3, metadata=flag_meta("steps per launch"))
    variants: str = field(default=",".join(VARIANTS), metadata=flag_meta(
        f"comma-separated, of {', '.join(VARIANTS + (PEER,))}"))
    fsdp2: bool = field(default=False, metadata=flag_meta(
        "also torch's FSDP2 (fully_shard per Linear) on the same gloo group"))
    limit_mib: int = field(default=0, metadata=flag_meta(
        "memory limit of each launch, all its ranks together (a cgroup; root); 0: none"))
    largest: bool = field(default=False, metadata=flag_meta(
        "search each variant's largest --layers under --limit-mib instead"))
    start: int = field(default=4, metadata=flag_meta("--largest: first --layers tried"))
    max_layers: int = field(default=64, metadata=flag_meta("--largest: search no higher"))
    fixed_mmap_threshold: bool = field(default=False, metadata=flag_meta(
        "run the ranks with MALLOC_MMAP_THRESHOLD_=131072 (glibc's dynamic threshold off)"))
    json: str | None = field(default=None, metadata=flag_meta("write the results to FILE"))

    def __post_init__(self):
        for name in ("workers", "hidden", "layers", "batch", "steps", "start", "max_layers"):
            at_least(getattr(self, name), 1, name.replace("_", "-"))
        at_least(self.limit_mib, 0, "limit-mib")
        unknown = [v for v in self.variants.split(",") if v not in VARIANTS + (PEER,)]
        if unknown or not self.variants:
            raise ValueError(f"--variants: unknown {', '.join(unknown) or 'empty list'}; "
                             f"choose from {', '.join(VARIANTS + (PEER,))}")
        if self.largest and not self.limit_mib:
            raise ValueError("--largest needs --limit-mib M (the limit to search under)")

    @property
    def variant_list(self) -> list[str]:
        names = list(dict.fromkeys(self.variants.split(",")))
        return names + [PEER] * (self.fsdp2 and PEER not in names)


def formula_bytes_per_param(variant: str, n: int) -> float:
    """ZeRO's model state per parameter, float32 Adam (4 param + 4 grad + 8 moments)."""
    return {"dp": 16.0, "zero-1": 8 + 8 / n, "zero-2": 4 + 12 / n, "zero-3": 16 / n,
            PEER: 16 / n}[variant]


def mlp_params(hidden: int, layers: int) -> int:
    """Parameters of MLP 784-hidden x layers-10 (weights and biases)."""
    return 785 * hidden + (layers - 1) * (hidden + 1) * hidden + (hidden + 1) * 10


# --- one launch per variant, optionally in a memory cgroup -------------------------------

def launch_variant(cfg: MemoryBenchConfig, variant: str, layers: int) -> dict:
    """One launch of ``variant`` with ``layers`` hidden layers: rank 0's figures and the
    cgroup's peak (``job_peak``), or ``ok: False`` and the launch's last line of stderr."""
    from .cgroup import MemoryCgroup

    one = replace(cfg, layers=layers, largest=False, json=None, variants=variant, fsdp2=False)
    with tempfile.TemporaryDirectory(prefix="gradsync-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "gradsync", "bench", "memory", *to_argv(one),
               "--variant", variant, "--result-file", str(out)]
        env = {**os.environ, **(FIXED_THRESHOLD if cfg.fixed_mmap_threshold else {})}
        job_peak = 0
        if cfg.limit_mib:
            with MemoryCgroup(cfg.limit_mib * MIB) as cg:
                proc = subprocess.run(cg.prefix() + cmd, env=env, capture_output=True, text=True)
                job_peak = cg.peak()
        else:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            return {"variant": variant, "layers": layers, "ok": False, "error": tail,
                    "job_peak": job_peak}
        return {"variant": variant, "layers": layers, "ok": True,
                **json.loads(out.read_text()), "job_peak": job_peak}


def _launch_ranks(cfg: MemoryBenchConfig, variant: str, result_file: str) -> int:
    """The launcher of one variant's ranks (inside the cgroup, if any)."""
    from ..launcher import LaunchError, launch

    argv = ["bench", "memory", *to_argv(cfg), "--variant", variant, "--result-file",
            result_file]
    try:
        done = launch(argv, cfg.workers, env={"OMP_NUM_THREADS": "1"})
    except LaunchError as exc:
        return usage(str(exc))
    if done.returncode != 0 and done.failed_rank is not None:
        print(f"gradsync: bench failed: worker rank {done.failed_rank} {done.reason}",
              file=sys.stderr, flush=True)
    return done.returncode


def largest(cfg: MemoryBenchConfig, variant: str) -> dict:
    """Search ``variant``'s largest --layers under the limit; the launches' outcomes."""
    tried, ok = [], {}  # ok: layers -> job peak bytes
    lo, hi, size = 0, None, min(cfg.start, cfg.max_layers)
    while True:
        r = launch_variant(cfg, variant, size)
        tried.append({k: r.get(k, "") for k in ("layers", "ok", "job_peak", "error")})
        print(f"#   {variant:<7} layers {size:3d}: "
              f"{'trained' if r['ok'] else 'FAILED ' + r['error'][:60]}, "
              f"job peak {r['job_peak'] / MIB:.0f} MiB", flush=True)
        if r["ok"]:
            lo, ok[size] = size, r["job_peak"]
        else:
            hi = size
        if (r["ok"] and size >= cfg.max_layers) or (hi is not None and hi - lo <= 1):
            break
        size = min(_next_size(ok, lo, hi, cfg.limit_mib * MIB), cfg.max_layers)
    return {"variant": variant, "largest_layers": lo, "tried": tried,
            "params": mlp_params(cfg.hidden, lo) if lo else 0, "job_peak": ok.get(lo, 0)}


def _next_size(ok: dict[int, int], lo: int, hi: int | None, limit: int) -> int:
    """The next --layers to try, strictly between ``lo`` (trained) and ``hi`` (failed)."""
    if len(ok) >= 2:  # where the line through the two largest that trained meets the limit
        (l1, p1), (l2, p2) = sorted(ok.items())[-2:]
        if p2 > p1:
            guess = l2 + int((limit - p2) * (l2 - l1) / (p2 - p1))
            return max(lo + 1, min(guess, hi - 1 if hi is not None else guess))
    return 2 * lo if hi is None else (lo + hi) // 2


# --- report --------------------------------------------------------------------------------

def peak_rows(cfg: MemoryBenchConfig, results: list[dict]) -> list[dict]:
    """Per variant, the largest rank's peak and model state against the formula."""
    rows = []
    for r in results:
        if not r["ok"]:
            rows.append({"variant": r["variant"], "ok": False, "error": r["error"],
                         "job_peak": r["job_peak"]})
            continue
        peak, state = max((row[0], sum(row[1:])) for row in r["per_rank"])
        bpp, want = state / r["n_params"], formula_bytes_per_param(r["variant"], cfg.workers)
        rows.append({"variant": r["variant"], "ok": True, "n_params": r["n_params"],
                     "state": state, "bytes_per_param": bpp, "formula": want,
                     "vs_formula": bpp / want - 1, "peak": peak, "job_peak": r["job_peak"]})
    return rows


def _print_peaks(rows: list[dict]) -> None:
    print(f"  {'variant':<8} {'state MiB':>9} {'B/param':>8} {'formula':>8} {'vs':>7} "
          f"{'peak MiB':>9} {'peak-state':>10} {'job peak MiB':>12}")
    for r in rows:
        job = f"{r['job_peak'] / MIB:12.0f}" if r["job_peak"] else f"{'-':>12}"
        if not r["ok"]:
            print(f"  {r['variant']:<8} FAILED: {r['error'][:90]}    {job}")
            continue
        print(f"  {r['variant']:<8} {r['state'] / MIB:9.1f} {r['bytes_per_param']:8.3f} "
              f"{r['formula']:8.3f} {100 * r['vs_formula']:+6.2f}% {r['peak'] / MIB:9.1f} "
              f"{(r['peak'] - r['state']) / MIB:10.1f}{job}")


def _print_largest(cfg: MemoryBenchConfig, results: list[dict]) -> None:
    print(f"  {'variant':<8} {'layers':>6} {'M params':>8} {'job peak MiB':>12}  first failure")
    for r in results:
        fail = min((t["layers"] for t in r["tried"] if not t["ok"]), default=None)
        why = f"layers {fail}" if fail is not None else f"none up to {cfg.max_layers}"
        print(f"  {r['variant']:<8} {r['largest_layers']:6d} {r['params'] / 1e6:8.1f} "
              f"{r['job_peak'] / MIB:12.0f}  {why}")


def run(cfg: MemoryBenchConfig) -> int:
    """Measure every variant, print the table (and write --json); the exit status."""
    command = " ".join(["gradsync", *sys.argv[1:]])
    limit = f", limit {cfg.limit_mib} MiB per launch (cgroup)" if cfg.limit_mib else ""
    model = f"784-{cfg.hidden}x{'L' if cfg.largest else cfg.layers}-10"
    allocator = ("MALLOC_MMAP_THRESHOLD_=131072" if cfg.fixed_mmap_threshold
                 else "glibc's defaults (dynamic mmap threshold)")
    print(f"# gradsync bench memory: {cfg.workers} ranks, MLP {model}, float32 Adam, batch "
          f"{cfg.batch}/rank, {cfg.steps} steps{limit}")
    print(f"# machine: {machine_line()}\n# command: {command}\n# allocator: {allocator}")
    if cfg.largest:
        results = [largest(cfg, v) for v in cfg.variant_list]
        _print_largest(cfg, results)
        out = {"largest": results}
    else:
        rows = peak_rows(cfg, [launch_variant(cfg, v, cfg.layers) for v in cfg.variant_list])
        _print_peaks(rows)
        out = {"peaks": rows}
    if cfg.json:
        try:
            Path(cfg.json).write_text(json.dumps(
                {"benchmark": "memory", "command": command, "machine": machine_line(),
                 "allocator": allocator, "config": vars(cfg), **out}, indent=2) + "\n")
        except OSError as exc:
            return usage(f"cannot write {cfg.json}: {exc.strerror}")
    failed = any(not r["ok"] for r in out.get("peaks", []))
    return 1 if failed and not cfg.limit_mib else 0


def main(args: argparse.Namespace) -> int:
    """`gradsync bench memory`: the controller, one variant's launcher, or a rank."""
    try:
        cfg = config_from_args(MemoryBenchConfig, args)
        if args.variant is not None and args.variant not in VARIANTS + (PEER,):
            raise UserError(f"--variant {args.variant}: unknown")
        if args.variant is None:
            return run(cfg)
    except UserError as exc:
        return usage(str(exc))
    if under_launcher():
        from .memory_rank import run_rank

        run_rank(args.variant, cfg.hidden, cfg.layers, cfg.batch, cfg.steps, args.result_file)
    return _launch_ranks(cfg, args.variant, args.result_file)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="peak memory per rank of DataParallel and ZeRO 1-3; largest model",
        description=__doc__.split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, MemoryBenchConfig)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one launch's (its launcher, ranks)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.set_defaults(bench=main)
