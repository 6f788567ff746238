"""Bus bandwidth of every gradsync all-reduce algorithm, reported as nccl-tests does.

For each size from -b to -e (times -f), every algorithm (native, ring, tree,
halving_doubling, reduce_broadcast, auto) reduces a float32 tensor by sum, interleaved: one
iteration runs each algorithm once, in an order that rotates per iteration. Before a call the
buffer is refilled and the ranks meet in a barrier; a call's time is the slowest rank's, and
a size's figure is the median over its iterations (fewer above 16 MiB, so the default run stays
near a minute). busbw = S / t * 2(n-1)/n (nccl-tests). Every result is checked against the
closed-form sum: rank r holds (i + r) mod 127 at index i.

Then: which algorithm ``auto`` picks at each size (gradsync.comm.collectives'
DEFAULT_COST_MODEL), which one was fastest, and the cost model fitted to this sweep
(t = A + S / B per algorithm, least squares on relative error) with the picks it would make;
``--calibrate`` adds gradsync.comm.calibrate()'s model.

Run from the repository root::

    python -m benchmarks.bench_allreduce                  # 1 KiB .. 64 MiB, x4, 2 workers
    python -m benchmarks.bench_allreduce -b 1K -e 1M -f 2 -n 50 --calibrate --json ar.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`make bench`): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import command, describe_machine, machine, run_workers, summarize, write_json

MODULE = "benchmarks.bench_allreduce"
ALGOS = ("native", "ring", "tree", "halving_doubling", "reduce_broadcast", "auto")
SHORT = {"native": "native", "ring": "ring", "tree": "tree", "halving_doubling": "hd",
         "reduce_broadcast": "red_bcast", "auto": "auto"}
FULL_ITERS_UP_TO = 16 << 20  # above this, iterations shrink in proportion to the size
MIN_ITERS = 10


def parse_size(text: str) -> int:
    """'1K', '64M', '1G' or plain bytes, powers of 1024 as in nccl-tests."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-b", "--minbytes", type=parse_size, default="1K", help="smallest size")
    p.add_argument("-e", "--maxbytes", type=parse_size, default="64M", help="largest size")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size multiplier")
    p.add_argument("-n", "--iters", type=int, default=30,
                   help=f"timed iterations per size (scaled down above "
                        f"{FULL_ITERS_UP_TO >> 20} MiB, at least {MIN_ITERS})")
    p.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed iterations")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--calibrate", action="store_true",
                   help="also run gradsync.comm.calibrate() and show its picks")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minbytes < 4 or args.maxbytes < args.minbytes or args.stepfactor < 2:
        p.error("need 4 <= -b <= -e and -f >= 2")
    if args.iters < 1 or args.warmup_iters < 0 or args.workers < 2:
        p.error("need -n >= 1, -w >= 0 and --workers >= 2")
    return args


def sizes(args: argparse.Namespace) -> list[int]:
    out, s = [], args.minbytes
    while s <= args.maxbytes:
        out.append(s // 4 * 4)
        s *= args.stepfactor
    return out


def iterations(nbytes: int, iters: int) -> int:
    if nbytes <= FULL_ITERS_UP_TO:
        return iters
    return min(iters, max(MIN_ITERS, iters * FULL_ITERS_UP_TO // nbytes))


# --- worker --------------------------------------------------------------------------------

def _worker(args: argparse.Namespace) -> None:
    import torch

    from gradsync import comm
    from gradsync.comm.collectives import DEFAULT_COST_MODEL

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=600)
    rank, world = group.rank, group.size
    calibrated = comm.calibrate(group) if args.calibrate else None

    # gamma, the time per byte reduced, as calibrate() measures it (both ranks at once, as in
    # an all-reduce): the fit below needs it to split a slope into wire time and add time.
    x, y = torch.ones(2 << 20), torch.ones(2 << 20)
    x.add_(y)
    start = time.perf_counter()
    for _ in range(20):
        x.add_(y)
    gamma = (time.perf_counter() - start) / 20 / (8 << 20)

    rows = []
    for nbytes in sizes(args):
        count = nbytes // 4
        idx = torch.arange(count)
        src = ((idx + rank) % 127).float()
        expected = sum(((idx + r) % 127) for r in range(world)).float()  # exact in float32
        buf = torch.empty(count)
        n_iter = iterations(nbytes, args.iters)
        total = args.warmup_iters + n_iter
        times = torch.zeros(len(ALGOS), total, dtype=torch.float64)
        wrong = torch.zeros(len(ALGOS), dtype=torch.float64)
        for it in range(total):
            for k in range(len(ALGOS)):
                j = (it + k) % len(ALGOS)
                buf.copy_(src)
                comm.barrier()
                start = time.perf_counter()
                comm.all_reduce(buf, op="sum", algorithm=ALGOS[j])
                times[j, it] = time.perf_counter() - start
                wrong[j] += (buf != expected).sum().item()
        comm.all_reduce(times, op="max", algorithm="native")
        comm.all_reduce(wrong, op="sum", algorithm="native")
        timed = times[:, args.warmup_iters:]
        rows.append({"bytes": nbytes, "count": count, "iters": n_iter,
                     "auto_chose": DEFAULT_COST_MODEL.choose(nbytes, world),
                     "algos": {a: {"time_us": summarize((1e6 * timed[j]).tolist()),
                                   "wrong": int(wrong[j].item())}
                               for j, a in enumerate(ALGOS)}})
    if rank == 0:
        Path(args.result_file).write_text(json.dumps({
            "world": world, "rows": rows, "gamma": gamma,
            "calibrated": None if calibrated is None else vars(calibrated)}))
    comm.destroy_process_group()


# --- report --------------------------------------------------------------------------------

def fit_line(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b x on relative error (weights 1/t): small sizes count as much as
    large ones, as they do for the choice between algorithms."""
    w = [1 / t ** 2 for t in ts]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    st = sum(wi * t for wi, t in zip(w, ts))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxt = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    b = (sw * sxt - sx * st) / (sw * sxx - sx * sx)
    return (st - b * sx) / sw, b


def fitted_model(raw: dict) -> tuple[dict, dict]:
    """CostModel constants that reproduce this sweep: each algorithm's line t = A + S b,
    inverted through the model's shape formulas (messages m, wire fraction w, reduced
    fraction r at p ranks): alpha = A / m, beta = (b - r gamma) / w."""
    from gradsync.comm.cost_model import shape

    p, gamma = raw["world"], raw["gamma"]
    lines, links = {}, {}
    for algo in ALGOS[:-1]:
        xs = [row["bytes"] for row in raw["rows"]]
        ts = [row["algos"][algo]["time_us"]["median"] * 1e-6 for row in raw["rows"]]
        a, b = lines[algo] = fit_line(xs, ts)
        m, w, r = shape(algo, 1.0, p)
        links[algo] = (max(1e-7, a / m), max(1e-13, (b - r * gamma) / w))
    return {"links": links, "gamma": gamma}, lines


def fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def fmt_model(m: dict) -> str:
    links = "  ".join(f"{algo} {alpha * 1e6:.0f}us 1/{1 / beta / 1e9:.2f}GB/s"
                      for algo, (alpha, beta) in m["links"].items())
    return f"gamma=1/{1 / m['gamma'] / 1e9:.2f}GB/s  per algorithm (alpha, beta): {links}"


def report(args: argparse.Namespace, raw: dict, cmd: str, mach: dict) -> dict:
    from gradsync.comm import CostModel

    p, rows = raw["world"], raw["rows"]
    factor = 2 * (p - 1) / p
    print(f"# all_reduce, float32 sum, {p} ranks (gloo on loopback, 1 thread each); "
          f"median of -n iterations (fewer above {FULL_ITERS_UP_TO >> 20} MiB), "
          f"{args.warmup_iters} warm-up; algorithms interleaved")
    print(f"# machine: {describe_machine(mach, raw['cpu_watch'])}")
    print(f"# command: {cmd}")
    print("# time in us (slowest rank, median); busbw in GB/s = S/t * 2(n-1)/n; "
          "#wrong = wrong elements over all iterations and ranks")
    head = f"# {'size':>10} {'count':>9} {'type':>6} {'redop':>5} {'iters':>5}"
    print(head + "".join(f" | {SHORT[a]:^22}" for a in ALGOS))
    print(f"# {'(B)':>10} {'(elements)':>9} {'':>6} {'':>5} {'':>5}"
          + " | {:>8} {:>6} {:>6}".format("time", "busbw", "#wrong") * len(ALGOS))
    busbw = {a: [] for a in ALGOS}
    for row in rows:
        line = f"  {row['bytes']:>10} {row['count']:>9} {'float':>6} {'sum':>5} {row['iters']:>5}"
        for a in ALGOS:
            t = row["algos"][a]["time_us"]["median"]
            bw = row["bytes"] / (t * 1e-6) / 1e9 * factor
            busbw[a].append(bw)
            row["algos"][a]["busbw_gbs"] = bw
            line += f" | {t:8.1f} {bw:6.3f} {row['algos'][a]['wrong']:>6}"
        print(line)
    print("# Avg bus bandwidth : " + "  ".join(f"{SHORT[a]} {sum(v) / len(v):.3f}"
                                               for a, v in busbw.items()))
    print("# spread of the time, us (min-max over iterations):")
    for row in rows:
        print(f"  {fmt_size(row['bytes']):>8}  " + "  ".join(
            f"{SHORT[a]} {row['algos'][a]['time_us']['min']:.0f}-"
            f"{row['algos'][a]['time_us']['max']:.0f}" for a in ALGOS))

    models = {"default": CostModel()}
    lines = {}
    if len(rows) >= 3:  # a line through fewer sizes says nothing
        fit, lines = fitted_model(raw)
        models["fitted"] = CostModel(**fit)
    if raw["calibrated"] is not None:
        models["calibrate()"] = CostModel(**raw["calibrated"])
    print("#\n# which algorithm: measured fastest (own algorithms and native) vs the picks of "
          "each cost model; t(pick)/t(best) from this sweep")
    print(f"# {'size':>8} {'fastest':>16}" + "".join(f" {name + ' picks':>28}" for name in models))
    for row in rows:
        t = {a: row["algos"][a]["time_us"]["median"] for a in ALGOS[:-1]}
        best = min(t, key=t.get)
        row["fastest"] = best
        row["picks"] = {}
        line = f"  {fmt_size(row['bytes']):>8} {best:>16}"
        for name, model in models.items():
            pick = model.choose(row["bytes"], p)
            row["picks"][name] = pick
            line += f" {pick:>20} {t[pick] / t[best]:6.2f}x"
        print(line)
    print("# auto, as run: " + ", ".join(f"{fmt_size(r['bytes'])} {r['auto_chose']}"
                                         for r in rows))
    if lines:
        print("#\n# lines t = A + S/B fitted to each algorithm's medians (relative least squares):")
    for algo, (a, b) in lines.items():
        rate = 1 / b / 1e9 if b > 0 else float("inf")
        print(f"  {algo:<17} A = {a * 1e6:8.1f} us   B = {rate:6.3f} GB/s")
    for name, model in models.items():
        print(f"# {name:<12} {fmt_model(vars(model))}")

    return {"benchmark": "allreduce", "command": cmd, "machine": mach,
            "cpu_watch": raw["cpu_watch"],
            "config": {k: v for k, v in vars(args).items()
                       if k not in ("worker", "result_file", "json")},
            "world": p, "rows": rows,
            "avg_busbw_gbs": {a: sum(v) / len(v) for a, v in busbw.items()},
            "lines": {a: {"intercept_s": ab[0], "s_per_byte": ab[1]} for a, ab in lines.items()},
            "models": {name: vars(m) for name, m in models.items()}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return
    cmd = command(MODULE, argv)
    mach = machine()
    raw = run_workers(MODULE, argv, args.workers)
    out = report(args, raw, cmd, mach)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
