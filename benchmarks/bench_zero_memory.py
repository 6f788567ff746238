"""Peak memory per rank of DataParallel, ShardedDataParallel stages 1-3 and torch's FSDP2
(``fsdp2``, bench_zero_fsdp.py), and which of them train under a memory limit.

Each variant runs in a launch of its own (fresh processes, so the peak belongs to it):
``--workers`` ranks build the MLP 784-H-...-H-10 (``--hidden``, ``--layers``; the default
13 x 2048 has 52 M parameters), float32 Adam, and take ``--steps`` steps on random data.
Per rank it reports:

- model state after the last step (bench_zero.model_state_bytes: parameters, gradients,
  optimizer state) against ZeRO's formulas (DP 16, stage 1 8 + 8/N, stage 2 4 + 12/N,
  stage 3 16/N bytes per parameter);
- the peak resident memory during the steps above the process's memory before the model
  was built: VmHWM (reset through /proc/self/clear_refs after the baseline) minus that
  baseline VmRSS. The peak is model state plus activations, the collectives' staging,
  stage 2's bucket while it fills, stage 3's gathered layers, and the allocator's slack.

Every variant runs ``algorithm="native"`` (the engine's collectives): on one host the
default puts buckets in shared-memory segments whose pages every rank maps, which a
per-process peak counts once per rank that touches them.

glibc's malloc raises its mmap threshold to the size of each large block freed (up to 32
MiB), after which stage 3's 16 MiB gathered layers and the collectives' staging buffers
come from the heap, whose freed holes it keeps: measured on one stage-3 rank (52 M
params), in-use heap 388 MiB but 909 MiB held and VmRSS 1117 MiB. So every launch runs with
``MALLOC_MMAP_THRESHOLD_=131072`` (:data:`ALLOCATOR_ENV`: glibc's default threshold, held
fixed), which returns such blocks to the system when they are freed; ``--glibc-dynamic``
measures glibc's default behaviour instead.

``--limit-mib M`` runs each launch in a memory cgroup of its own (cgroup v2 ``memory.max``,
or v1 ``memory.limit_in_bytes``; created under /sys/fs/cgroup and removed after, so it
needs root) holding the launcher and all its ranks: a variant that needs more is killed by
the kernel's OOM killer, which the report says. Run from the repository root, alone::

    flock -x /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero_memory
    flock -x /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero_memory \\
        --limit-mib 2600
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

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (REPO, add_worker_flags, command, describe_machine, machine,
                        run_workers, write_json)
from benchmarks.bench_zero import PEER, VARIANTS, formula_bytes_per_param

MODULE = "benchmarks.bench_zero_memory"
MIB = 1 << 20
# glibc's default mmap threshold (128 KiB), fixed: setting it turns off the dynamic raise.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="ranks")
    p.add_argument("--hidden", type=int, default=2048, help="hidden width")
    p.add_argument("--layers", type=int, default=13, help="hidden layers")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=3, help="steps per variant")
    p.add_argument("--variants", default=",".join(VARIANTS + (PEER,)),
                   help="comma-separated; fsdp2: torch's fully_shard (bench_zero_fsdp.py)")
    p.add_argument("--limit-mib", type=int, default=0,
                   help="memory limit of each launch (all its ranks together); 0: none")
    p.add_argument("--glibc-dynamic", action="store_true",
                   help=f"leave glibc's dynamic mmap threshold on (not {ALLOCATOR_ENV})")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one launch's variant
    add_worker_flags(p)
    args = p.parse_args(argv)
    check_args(p, args, ("workers", "hidden", "layers", "batch", "steps"))
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, counts) -> None:
    """``p.error`` (exit 2) unless every flag in ``counts`` is at least 1 and every one of
    ``--variants`` is known (this benchmark's and bench_zero_largest.py's)."""
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    unknown = set(args.variants.split(",")) - set(VARIANTS + (PEER,))
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from "
                f"{', '.join(VARIANTS + (PEER,))}")


# --- worker --------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _warm_up(x, y) -> None:
    """One step of a tiny local model first: torch's lazily made kernels, thread pools and
    allocator caches then belong to the baseline, not to the first variant's peak."""
    import torch
    import torch.nn.functional as F

    from gradsync.models import MLP

    tiny = MLP(784, [16], 10)
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-3)
    F.cross_entropy(tiny(x), y).backward()
    opt.step()


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_zero import _build, model_state_bytes
    from gradsync import comm

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=600)
    gen = torch.Generator().manual_seed(1000 + group.rank)
    x = torch.randn(args.batch, 784, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    _warm_up(x, y)
    comm.barrier()
    base_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    model, opt = _build(args.variant, args.hidden, args.layers, dp_algorithm="native",
                        zero_algorithm="native")
    for _ in range(args.steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    peak = (_status_kib("VmHWM") - base_kib) * 1024
    mine = torch.tensor([peak, *model_state_bytes(model, opt).values()], dtype=torch.float64)
    rows = [torch.empty_like(mine) for _ in range(group.size)]
    comm.all_gather(rows, mine, algorithm="native")
    if group.rank == 0:
        # Counted from the buckets: stage 3's state_dict() would gather the whole model on
        # every rank, which a memory limit (the cgroup's peak) would count.
        n_params = (sum(b.numel for b in model.buckets) if hasattr(model, "buckets")
                    else sum(p.numel() for p in model.parameters()))
        Path(args.result_file).write_text(json.dumps(
            {"n_params": n_params, "per_rank": [r.tolist() for r in rows]}))
    comm.destroy_process_group()
    # Leave without the interpreter's finalization, as gradsync train's ranks do
    # (cli._exit_rank): torch 2.13's gloo can abort a finished process there ("terminate
    # called without an active exception"), seen here in 2 of 9 zero-2 launches.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- one launch per variant, optionally in a memory cgroup -------------------------------

class MemoryCgroup:
    """A memory cgroup with a limit, for one launch: ``prefix`` puts a command in it."""

    def __init__(self, limit_bytes: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, self.limit_file, self.peak_file = (
                Path(f"/sys/fs/cgroup/gradsync-bench-{os.getpid()}"), "memory.max", "memory.peak")
        elif Path("/sys/fs/cgroup/memory").is_dir():  # v1
            self.path, self.limit_file, self.peak_file = (
                Path(f"/sys/fs/cgroup/memory/gradsync-bench-{os.getpid()}"),
                "memory.limit_in_bytes", "memory.max_usage_in_bytes")
        else:
            raise SystemExit("--limit-mib: no cgroup memory controller under /sys/fs/cgroup")
        self.limit = limit_bytes

    def __enter__(self) -> "MemoryCgroup":
        try:
            self.path.mkdir()
            (self.path / self.limit_file).write_text(str(self.limit))
        except OSError as e:
            raise SystemExit(f"--limit-mib: cannot create {self.path} ({e}); it needs root")
        return self

    def prefix(self) -> list[str]:
        # The shell moves itself into the cgroup, then becomes the launch: every rank it
        # starts is born inside.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def peak(self) -> int:
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the last exiting process may still be charged for a moment
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _launch_one(args: argparse.Namespace, argv: list[str], variant: str) -> dict:
    """One launch of ``variant``; its report, or how it failed."""
    with tempfile.TemporaryDirectory(prefix="gradsync-bench-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, "-m", MODULE, *argv, "--variant", variant, "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO),
               **({} if args.glibc_dynamic else ALLOCATOR_ENV)}
        if args.limit_mib:
            with MemoryCgroup(args.limit_mib * MIB) as cg:
                proc = subprocess.run(cg.prefix() + cmd, env=env, capture_output=True, text=True)
                job_peak = cg.peak()
        else:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            job_peak = 0
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"variant": variant, "ok": False, "error": tail, "job_peak": job_peak}
        return {"variant": variant, "ok": True, **json.loads(out.read_text()),
                "job_peak": job_peak}


def report(args: argparse.Namespace, results: list[dict], cmd: str, mach: dict) -> None:
    n = args.workers
    limit = f", limit {args.limit_mib} MiB per launch (cgroup)" if args.limit_mib else ""
    print(f"# peak memory per rank, {n} ranks, MLP 784-{args.hidden}x{args.layers}-10, "
          f"float32 Adam, batch {args.batch}/rank, {args.steps} steps{limit}")
    print(f"# machine: {describe_machine(mach)}\n# command: {cmd}")
    print(f"# allocator: {allocator(args)}")
    print(f"  {'variant':<8} {'state MiB':>9} {'B/param':>8} {'formula':>8} {'vs':>7} "
          f"{'peak MiB':>9} {'peak-state':>10} {'job peak MiB':>12}")
    for r in results:
        job = f"{r['job_peak'] / MIB:12.0f}" if r["job_peak"] else f"{'-':>12}"
        if not r["ok"]:
            print(f"  {r['variant']:<8} FAILED: {r['error'][:90]}{' ' * 4}{job}")
            continue
        peak, state = max((row[0], sum(row[1:])) for row in r["per_rank"])
        bpp, want = state / r["n_params"], formula_bytes_per_param(r["variant"], n)
        print(f"  {r['variant']:<8} {state / MIB:9.1f} {bpp:8.3f} {want:8.3f} "
              f"{100 * (bpp / want - 1):+6.2f}% {peak / MIB:9.1f} {(peak - state) / MIB:10.1f}"
              f"{job}")


def allocator(args: argparse.Namespace) -> str:
    if args.glibc_dynamic:
        return "glibc defaults (dynamic mmap threshold)"
    return " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.variant:  # one launch (inside the cgroup, if any)
        inner = _without(argv, "--json")
        raw = run_workers(MODULE, inner, args.workers)
        write_json(args.json, raw)
        return
    cmd, mach = command(MODULE, argv), machine()
    plain = _without(argv, "--json")
    results = [_launch_one(args, plain, v) for v in args.variants.split(",")]
    report(args, results, cmd, mach)
    if args.json:
        write_json(args.json, {"benchmark": "zero-memory", "command": cmd, "machine": mach,
                               "limit_mib": args.limit_mib, "allocator": allocator(args),
                               "results": results})


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
