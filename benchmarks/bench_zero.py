"""Model-state memory per rank and samples/s of gradsync.DataParallel and ShardedDataParallel.

Two parts in one launch of ``--workers`` ranks (float32 Adam, cross-entropy on random data):

1. Memory: an MLP 784-H-...-H-10 (``--hidden`` H, ``--layers`` hidden layers; the default,
   13 x 2048, has 52 M parameters) is wrapped as ``dp`` (DataParallel + torch.optim.Adam),
   ``zero-1``, ``zero-2`` and ``zero-3``, one at a time (built, one step, measured,
   freed). Measured are the bytes of every distinct storage behind the parameters (stage
   3: its shards; the whole parameters are freed between steps), the gradients
   (``param.grad``, the shard pieces' ``.grad``) and the optimizer state, after
   ``optimizer.step()``, against ZeRO's float32-Adam formulas (DP 16, stage 1 8 + 8/N,
   stage 2 4 + 12/N, stage 3 16/N bytes per parameter), and torch's FSDP2 beside them.
   DataParallel and the stages run ``algorithm="native"`` here: their one-host default
   puts the gradient buckets (DataParallel, stage 1) in shared memory with a slot per
   rank, which this count cannot split. Transient buffers (a stage-2
   bucket while it is filled, a stage-3 layer while it is gathered, the collectives'
   staging) are not model state and not counted.
2. Throughput: the variants of a smaller MLP (``--tp-hidden``, ``--tp-layers``) are
   alive together; after a warm-up, each round runs each for ``--steps`` timed steps in an
   order shuffled per round; a round's time is the slowest rank's.
3. FSDP2's gradients on gloo: averaged or summed (bench_zero_fsdp.fsdp2_gradient_scale).

``fsdp2`` is torch's ``fully_shard`` on the same gloo group (bench_zero_fsdp.py);
``--no-fsdp2`` leaves it out. Peak memory and memory limits: bench_zero_memory.py.

Run from the repository root, alone on the machine::

    flock /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero --workers 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (add_worker_flags, command, describe_machine, machine, run_workers,
                        summarize, write_json)

MODULE = "benchmarks.bench_zero"
VARIANTS = ("dp", "zero-1", "zero-2", "zero-3")
PEER = "fsdp2"  # torch's FSDP2 (bench_zero_fsdp.py), unless --no-fsdp2


def formula_bytes_per_param(variant: str, n: int) -> float:
    """ZeRO's model state per parameter, float32 Adam (4 param + 4 grad + 8 moments)."""
    return {"dp": 16.0, "zero-1": 8 + 8 / n, "zero-2": 4 + 12 / n, "zero-3": 16 / n,
            PEER: 16 / n}[variant]


def variants(args: argparse.Namespace) -> tuple[str, ...]:
    return VARIANTS + ((PEER,) if args.fsdp2 else ())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="ranks")
    p.add_argument("--hidden", type=int, default=2048, help="memory part: hidden width")
    p.add_argument("--layers", type=int, default=13, help="memory part: hidden layers")
    p.add_argument("--tp-hidden", type=int, default=1024, help="throughput part: width")
    p.add_argument("--tp-layers", type=int, default=2, help="throughput part: hidden layers")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--no-fsdp2", dest="fsdp2", action="store_false",
                   help="leave out torch's FSDP2 (fully_shard) peer")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    add_worker_flags(p)
    args = p.parse_args(argv)
    for name in ("workers", "hidden", "layers", "tp_hidden", "tp_layers", "batch", "steps",
                 "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --- worker --------------------------------------------------------------------------------

def _build(name: str, hidden: int, layers: int, dp_algorithm: str = "auto",
           zero_algorithm: str = "auto"):
    """(wrapped model, optimizer) of variant ``name``; collective."""
    import torch

    import gradsync
    from gradsync.models import MLP

    if name == PEER:
        from benchmarks.bench_zero_fsdp import build_fsdp2
        return build_fsdp2(hidden, layers)
    torch.manual_seed(0)
    model = MLP(784, [hidden] * layers, 10)
    if name == "dp":
        dp = gradsync.DataParallel(model, algorithm=dp_algorithm)
        return dp, torch.optim.Adam(dp.parameters(), lr=1e-3)
    sdp = gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=int(name[-1]), lr=1e-3,
                                       algorithm=zero_algorithm)
    return sdp, sdp.optimizer


def _one_step(model, opt, x, y) -> None:
    import torch.nn.functional as F

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _memory(args, rank: int) -> dict:
    import torch

    from gradsync.bench.memory_rank import model_state_bytes

    gen = torch.Generator().manual_seed(1000 + rank)
    x, y = torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,))
    out = {}
    for name in variants(args):  # one at a time: a 52 M model in four copies would not be fair
        # On one host DataParallel's and stage 1's default keeps the gradient buckets in a
        # segment shared by the ranks (N slots, mapped by each): "native" keeps them
        # private, the plain 4 B/param.
        model, opt = _build(name, args.hidden, args.layers, dp_algorithm="native",
                            zero_algorithm="native")
        _one_step(model, opt, x, y)
        out[name] = {**model_state_bytes(model, opt),
                     "n_params": sum(p.numel() for p in model.state_dict().values())}
        del model, opt
    return out


def _throughput(args, rank: int) -> dict:
    import torch

    from gradsync import comm

    gen = torch.Generator().manual_seed(2000 + rank)
    xs = torch.randn(args.steps, args.batch, 784, generator=gen)
    ys = torch.randint(0, 10, (args.steps, args.batch), generator=gen)
    names = variants(args)
    models = {name: _build(name, args.tp_hidden, args.tp_layers) for name in names}

    def timed(name: str, steps: int) -> float:
        comm.barrier()
        start = time.perf_counter()
        for i in range(steps):
            _one_step(*models[name], xs[i % args.steps], ys[i % args.steps])
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        comm.all_reduce(t, op="max", algorithm="native")  # the slowest rank's time
        return t.item()

    for name in names:
        timed(name, args.warmup)
    rates = {name: [] for name in names}
    shuffler = random.Random(0)  # same seed on every rank: the same order everywhere
    for _ in range(args.rounds):
        for name in shuffler.sample(names, len(names)):
            seconds = timed(name, args.steps)
            rates[name].append(args.batch * args.steps * comm.get_world_size() / seconds)
    # state_dict(): stage 3 gathers its parameters for it (collective, on every rank).
    ref = _whole(models["dp"][0])
    drift = {name: max((a - b).abs().max().item() for a, b in
                       zip(_whole(models[name][0]), ref))
             for name in names[1:]}
    return {"rates": rates, "max_param_diff_vs_dp": drift,
            "n_params": sum(p.numel() for p in ref)}


def _whole(model) -> list:
    """The whole parameters in registration order (collective for stage 3 and FSDP2)."""
    if not hasattr(model, "module"):
        from benchmarks.bench_zero_fsdp import full_parameters
        return full_parameters(model)
    return list(model.state_dict().values())


def _worker(args: argparse.Namespace) -> None:
    import torch

    from gradsync import comm

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=600)
    memory = _memory(args, group.rank)
    # (variants * 3,) bytes of this rank; gathered, every rank's (ranks differ by padding).
    keys = ("params", "grads", "optimizer")
    names = variants(args)
    mine = torch.tensor([memory[v][k] for v in names for k in keys], dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(group.size)]
    comm.all_gather(gathered, mine)
    per_rank = [{v: dict(zip(keys, g.view(len(names), 3)[i].tolist()))
                 for i, v in enumerate(names)} for g in gathered]
    result = {"memory": per_rank, "n_params": memory["dp"]["n_params"],
              "throughput": _throughput(args, group.rank), "world": group.size}
    if args.fsdp2:
        from benchmarks.bench_zero_fsdp import fsdp2_gradient_scale
        result["fsdp2_gradients"] = fsdp2_gradient_scale(group.rank, group.size)
    if group.rank == 0:
        Path(args.result_file).write_text(json.dumps(result))
    comm.destroy_process_group()


# --- launcher and report -------------------------------------------------------------------

def _memory_rows(raw: dict) -> list[dict]:
    n, psi = raw["world"], raw["n_params"]
    rows = []
    for v in raw["memory"][0]:
        per_rank = [sum(r[v].values()) for r in raw["memory"]]
        worst = max(range(n), key=lambda r: per_rank[r])
        want = formula_bytes_per_param(v, n)
        rows.append({"variant": v, **{k: raw["memory"][worst][v][k] for k in
                                      ("params", "grads", "optimizer")},
                     "total_max_rank": per_rank[worst], "total_min_rank": min(per_rank),
                     "bytes_per_param": per_rank[worst] / psi, "formula": want,
                     "vs_formula": per_rank[worst] / psi / want - 1})
    return rows


def report(args: argparse.Namespace, raw: dict, cmd: str, mach: dict) -> dict:
    n, mb = raw["world"], 1 / (1 << 20)
    print(f"# ShardedDataParallel, {n} ranks x 1 thread, float32 Adam, batch {args.batch}/rank")
    print(f"# machine: {describe_machine(mach, raw['cpu_watch'])}")
    print(f"# command: {cmd}")
    print(f"#\n# 1. model state per rank, MLP 784-{args.hidden}x{args.layers}-10 "
          f"({raw['n_params']:,} params), after optimizer.step(); the largest rank's")
    print(f"  {'variant':<8} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} "
          f"{'total MiB':>10} {'B/param':>8} {'formula':>8} {'vs formula':>10}")
    rows = _memory_rows(raw)
    for r in rows:
        print(f"  {r['variant']:<8} {r['params'] * mb:11.1f} {r['grads'] * mb:10.1f} "
              f"{r['optimizer'] * mb:10.1f} {r['total_max_rank'] * mb:10.1f} "
              f"{r['bytes_per_param']:8.3f} {r['formula']:8.3f} {100 * r['vs_formula']:+9.2f}%")
    tp = raw["throughput"]
    summary = {v: summarize(rates) for v, rates in tp["rates"].items()}
    print(f"#\n# 2. samples/s (whole job), MLP 784-{args.tp_hidden}x{args.tp_layers}-10 "
          f"({tp['n_params']:,} params), {args.rounds} rounds x {args.steps} steps, "
          f"{args.warmup} warm-up")
    print(f"  {'variant':<8} {'samples/s':>10} {'min':>8} {'max':>8} {'IQR':>15} {'/ dp':>6}")
    ratios = {}
    for v in summary:
        s = summary[v]
        per_round = summarize([a / b for a, b in zip(tp["rates"][v], tp["rates"]["dp"])])
        ratios[v] = per_round
        print(f"  {v:<8} {s['median']:10.1f} {s['min']:8.1f} {s['max']:8.1f} "
              f"{s['q1']:7.1f}-{s['q3']:<7.1f} {s['median'] / summary['dp']['median']:6.3f}"
              f"   (per round: median {per_round['median']:.3f}, "
              f"{per_round['min']:.3f}-{per_round['max']:.3f})")
    drift = ", ".join(f"{k} {v:.1e}" for k, v in tp["max_param_diff_vs_dp"].items())
    print(f"# max |param - dp param| after the run: {drift}")
    g = raw.get("fsdp2_gradients")
    if g:
        kind = ("averaged" if abs(g["ratio_median"] - 1) < 1e-6 else
                "summed" if abs(g["ratio_median"] - g["world"]) < 1e-6 else "neither")
        print(f"# FSDP2 gradients on gloo vs one process on the global batch (float64): "
              f"ratio {g['ratio_median']:.6f} ({g['ratio_min']:.6f}-{g['ratio_max']:.6f}) "
              f"on {g['world']} ranks: {kind}")
    return {"benchmark": "zero", "command": cmd, "machine": mach, "cpu_watch": raw["cpu_watch"],
            "memory": rows, "memory_per_rank": raw["memory"], "samples_per_s": summary,
            "ratio_vs_dp_per_round": ratios, "max_param_diff_vs_dp": tp["max_param_diff_vs_dp"],
            "fsdp2_gradients": g}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return
    cmd, mach = command(MODULE, argv), machine()
    out = report(args, run_workers(MODULE, list(argv), args.workers), cmd, mach)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
