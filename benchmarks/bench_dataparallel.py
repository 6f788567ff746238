"""Training throughput of gradsync.DataParallel against torch DDP and one process alone.

The synthetic-mlp workload: MLP 784-H-H-10 (H = 1024: 1,863,690 float32 parameters), batch 64
per worker, plain SGD (lr 0.01), cross-entropy on random data that is fixed per step (step i
of every variant sees the same batch). Variants:

    gradsync-auto / -native / -ring / -tree
                                      gradsync.DataParallel(model, algorithm=...); tree is
                                      there because on 2 ranks it can beat native at these
                                      bucket sizes (3-4 MiB) while auto never picks it
    ddp                               torch.nn.parallel.DistributedDataParallel on gloo
    no-comm                           every worker trains its own model at the same time,
                                      with no communication: the ceiling for any wrapper here
    single                            one process alone (rank 0; the others wait in a barrier)

Every variant's model is built and wrapped once, from the same seed, and reused. After a
warm-up, each round runs every variant for one untimed and ``--steps`` timed steps, in an
order shuffled afresh each round, so slow phases of a shared machine hit all variants alike
and no variant always follows the same one. A round's
time is the slowest rank's. Throughput is samples/s of the whole job (workers x batch / step
time); the ratios compare medians, and per-round ratios (variant and baseline measured
seconds apart) give their spread.

Run from the repository root (2 workers, 1 compute thread each)::

    python -m benchmarks.bench_dataparallel
    python -m benchmarks.bench_dataparallel --workers 2 --rounds 9 --json dp.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`make bench`): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (add_worker_flags, command, describe_machine, machine, run_workers,
                        summarize, write_json)

MODULE = "benchmarks.bench_dataparallel"
VARIANTS = ("gradsync-auto", "gradsync-native", "gradsync-ring", "gradsync-tree", "ddp", "no-comm",
            "single")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--hidden", type=int, default=1024, help="width of both hidden layers")
    p.add_argument("--batch", type=int, default=64, help="samples per worker per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=20, help="rounds (repetitions) per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    add_worker_flags(p)
    args = p.parse_args(argv)
    for name in ("workers", "hidden", "batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# --- worker --------------------------------------------------------------------------------

def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    # DDP is the baseline under test, so this benchmark (not gradsync) imports it.
    from torch.nn.parallel import DistributedDataParallel

    import gradsync
    from gradsync import comm
    from gradsync.models import MLP

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=600)
    rank, world = group.rank, group.size

    # (steps, batch, 784) inputs and (steps, batch) labels, different on every rank.
    gen = torch.Generator().manual_seed(1000 + rank)
    xs = torch.randn(args.steps, args.batch, 784, generator=gen)
    ys = torch.randint(0, 10, (args.steps, args.batch), generator=gen)

    def build(name: str):
        torch.manual_seed(0)
        model = MLP(784, [args.hidden, args.hidden], 10)
        if name == "ddp":
            model = DistributedDataParallel(model)
        elif name.startswith("gradsync-"):
            model = gradsync.DataParallel(model, algorithm=name.split("-", 1)[1])
        return model, torch.optim.SGD(model.parameters(), lr=0.01)

    models = {name: build(name) for name in VARIANTS}  # wrapping is collective: same order

    def train(name: str, steps: int) -> float:
        model, opt = models[name]
        start = time.perf_counter()
        for i in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(xs[i % args.steps]), ys[i % args.steps]).backward()
            opt.step()
        return time.perf_counter() - start

    def comm_wait_s(name: str) -> float:
        """gradsync's running total of time backward waited for all-reduces (0 for others)."""
        stats = getattr(models[name][0], "stats", None)
        return stats.comm_wait_s if stats is not None else 0.0

    def timed(name: str, steps: int, settle: int = 1) -> tuple[float, float]:
        """Seconds for ``steps`` steps of ``name`` as the slowest rank saw them, and this
        rank's comm wait in those steps; ``settle`` untimed steps first take the cost of
        switching from the previous variant."""
        runs_here = name != "single" or rank == 0
        if runs_here:
            train(name, settle)
        comm.barrier()
        wait_before = comm_wait_s(name)
        elapsed = train(name, steps) if runs_here else 0.0
        t = torch.tensor([elapsed], dtype=torch.float64)
        comm.all_reduce(t, op="max", algorithm="native")
        return t.item(), comm_wait_s(name) - wait_before

    for name in VARIANTS:
        timed(name, args.warmup, settle=0)

    rates = {name: [] for name in VARIANTS}
    comm_wait = {name: [] for name in VARIANTS if name.startswith("gradsync-")}
    shuffler = random.Random(0)  # same seed on every rank: all ranks run the same order
    for _ in range(args.rounds):
        # A fresh order each round, so no variant always follows the same one.
        for name in shuffler.sample(VARIANTS, len(VARIANTS)):
            seconds, wait = timed(name, args.steps)
            samples = args.batch * args.steps * (1 if name == "single" else world)
            rates[name].append(samples / seconds)
            if name in comm_wait:
                comm_wait[name].append(wait / args.steps)

    # Sanity check that the variants did the same work: the data-parallel models saw the same
    # batches from the same start, so their parameters should agree with DDP's to rounding.
    ddp_params = list(models["ddp"][0].module.parameters())
    drift = {name: max((a - b).abs().max().item() for a, b in
                       zip(models[name][0].module.parameters(), ddp_params))
             for name in comm_wait}

    if rank == 0:
        n_params = sum(p.numel() for p in ddp_params)
        Path(args.result_file).write_text(json.dumps({
            "rates": rates, "comm_wait_s_per_step": comm_wait, "max_param_diff_vs_ddp": drift,
            "params": n_params, "world": world}))
    comm.destroy_process_group()


# --- launcher and report -------------------------------------------------------------------

def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num[r] / den[r]: both measured in the same round."""
    return summarize([a / b for a, b in zip(num, den)])


def report(args: argparse.Namespace, raw: dict, cmd: str, mach: dict) -> dict:
    rates = raw["rates"]
    summary = {name: summarize(v) for name, v in rates.items()}
    med = {name: s["median"] for name, s in summary.items()}
    ratios = {f"{name}/ddp": {"of_medians": med[name] / med["ddp"],
                              "per_round": ratio_stats(rates[name], rates["ddp"])}
              for name in VARIANTS if name.startswith("gradsync-")}
    for num, den in (("ddp", "no-comm"), ("ddp", "single"), ("no-comm", "single")):
        ratios[f"{num}/{den}"] = {"of_medians": med[num] / med[den],
                                  "per_round": ratio_stats(rates[num], rates[den])}

    w = raw["world"]
    print(f"# synthetic-mlp: MLP 784-{args.hidden}-{args.hidden}-10 ({raw['params']:,} params, "
          f"float32), batch {args.batch}/worker, SGD lr 0.01, {w} workers x 1 thread")
    print(f"# {args.rounds} rounds x {args.steps} timed steps per variant, after "
          f"{args.warmup} warm-up steps; order shuffled per round, 1 untimed step per block")
    print(f"# machine: {describe_machine(mach, raw['cpu_watch'])}")
    print(f"# command: {cmd}")
    print(f"#\n# {'variant':<16} {'samples/s':>10} {'min':>8} {'max':>8} {'IQR':>15} "
          f"{'ms/step':>8} {'wait ms':>8}")
    for name in VARIANTS:
        s = summary[name]
        workers = 1 if name == "single" else w
        step_ms = 1e3 * args.batch * workers / s["median"]
        waits = raw["comm_wait_s_per_step"].get(name)
        wait = f"{1e3 * statistics.median(waits):8.2f}" if waits else f"{'-':>8}"
        print(f"  {name:<16} {s['median']:10.0f} {s['min']:8.0f} {s['max']:8.0f} "
              f"{s['q1']:7.0f}-{s['q3']:<7.0f} {step_ms:8.2f} {wait}")
    print("#\n# ratio                of medians   per round: median  IQR            [min - max]")
    for key, r in ratios.items():
        pr = r["per_round"]
        print(f"  {key:<20} {r['of_medians']:10.3f}   {pr['median']:17.3f}  "
              f"{pr['q1']:.3f}-{pr['q3']:.3f}  [{pr['min']:.3f} - {pr['max']:.3f}]")
    print("#\n# samples/s: whole job (workers x batch / step time); single: 1 process x batch.")
    print("# wait ms: median time per step backward's end waited for gradsync's all-reduces.")
    drift = ", ".join(f"{k} {v:.1e}" for k, v in raw["max_param_diff_vs_ddp"].items())
    print(f"# max |param - ddp param| after the run: {drift}")
    return {"benchmark": "dataparallel", "command": cmd, "machine": mach,
            "cpu_watch": raw["cpu_watch"],
            "config": {k: v for k, v in vars(args).items()
                       if k not in ("worker", "result_file", "json")},
            "samples_per_s": summary, "samples_per_s_per_round": rates, "ratios": ratios,
            "comm_wait_s_per_step": raw["comm_wait_s_per_step"],
            "max_param_diff_vs_ddp": raw["max_param_diff_vs_ddp"], "params": raw["params"]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return
    cmd = command(MODULE, argv)
    mach = machine()
    raw = run_workers(MODULE, [a for a in argv], args.workers)
    out = report(args, raw, cmd, mach)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
