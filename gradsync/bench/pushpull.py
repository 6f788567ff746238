"""One push+pull of the Parameter Server against gloo's all-reduce, in an emulated cluster.

    python -m gradsync.bench.pushpull --workers 3 --servers 3 --rate 200mbit --size 16M
    python -m gradsync.bench.pushpull --workers 3 --servers 3 --colocated --rate 200mbit

n workers each push S bytes of gradients to k sync servers and pull the S bytes they return
(BytePS's bound: max(S/B, n*S/(k*B))); then the same n workers all-reduce S bytes with gloo's
ring (bound 2(n-1)/n * S/B). Dedicated servers get their own hosts (n + k hosts, one rank
each); ``--colocated`` puts one server beside each worker (n hosts of two ranks, k = n).
Each figure is the slowest worker's time per iteration, median over ``--iters`` after one
warm-up. Needs root (the lab); the controller prints the table and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from .ranks import run_for_result
from .report import bound_allreduce_s, bound_ps_s, link_bytes_per_s, machine_line
from .sweep import parse_size


def _as_rank(args) -> None:
    import torch
    from torch import nn

    from .. import comm
    from ..lab import current
    from ..ps import PSArchitecture
    from ..ps.placement import lab_links

    group = comm.init_process_group()
    numel = args.size // 4
    model = nn.Module()
    model.weights = nn.ParameterList(  # four float32 tensors of S/4 bytes each
        [nn.Parameter(torch.zeros(numel // 4 + (i < numel % 4))) for i in range(4)])
    arch = PSArchitecture(args.servers, "sync", 0, group,
                          server_ranks="colocated" if args.colocated else None,
                          partition_mb=args.partition_mb,
                          topology=lab_links(current(), group.size))  # shards follow the links
    workers = comm.new_group(arch.workers)
    make = lambda params: torch.optim.SGD(params, lr=0.0)  # noqa: E731 - the sum is timed
    if not arch.is_worker:
        arch.serve(model, make)
        return
    ps_model, opt = arch.prepare(model, make)
    params = list(model.parameters())
    times: dict[str, list[float]] = {"ps": [], "allreduce": []}
    import time

    for i in range(1 + args.iters):
        comm.barrier(workers)
        start = time.perf_counter()
        for p in params:
            p.grad = torch.ones_like(p)
        ps_model._finish_backward()  # noqa: SLF001 - push every partition, as backward would
        opt.step()
        if i:
            times["ps"].append(time.perf_counter() - start)
    flat = torch.ones(numel)
    for i in range(1 + args.iters):
        comm.barrier(workers)
        start = time.perf_counter()
        comm.all_reduce(flat, group=workers, algorithm="native")
        if i:
            times["allreduce"].append(time.perf_counter() - start)
    summary = arch.finish()
    slowest = {}
    for key, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        comm.all_reduce(t, op="max", group=workers)
        slowest[key] = t.tolist()
    if group.rank == arch.workers[0]:
        Path(args.result_file).write_text(json.dumps({
            "times": slowest, "partition_bytes": summary["partition_bytes"],
            "partitions_per_server": summary["partitions_per_server"],
            "server_ranks": summary["server_ranks"]}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradsync.bench.pushpull",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--colocated", action="store_true",
                   help="one server beside each worker (--servers = --workers)")
    p.add_argument("--rate", default="200mbit")
    p.add_argument("--size", default="16M", help="bytes pushed and pulled (16M, 4M, ...)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--partition-mb", type=float, default=None)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = parse_size(args.size)
    if "RANK" in os.environ:
        _as_rank(args)
        return 0
    if args.colocated and args.servers != args.workers:
        print("gradsync: error: --colocated puts one server beside each worker: "
              "--servers must equal --workers", file=sys.stderr)
        return 2
    from ..lab import lab_launch, up

    n, k = args.workers, args.servers
    hosts, per = (n, 2) if args.colocated else (n + k, 1)

    def launch(rank_argv: list[str]) -> tuple[int, None]:
        env = {"OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
        with up(hosts, args.rate, None, per) as lab:  # down on any exit, Ctrl-C included
            return lab_launch(lab, rank_argv, module="gradsync.bench.pushpull", env=env), None

    rc, raw, _ = run_for_result(argv if argv is not None else sys.argv[1:], launch=launch)
    if rc != 0:
        return rc
    s_over_b = args.size / link_bytes_per_s(args.rate)
    ps_bound = (bound_allreduce_s(args.size, n, args.rate) if args.colocated
                else bound_ps_s(args.size, n, k, args.rate))
    ps, ar = (statistics.median(raw["times"][key]) for key in ("ps", "allreduce"))
    print(f"# python -m gradsync.bench.pushpull {shlex.join(argv or sys.argv[1:])}")
    print(f"# {machine_line()}")
    print(f"# {n} workers, {k} {'co-located' if args.colocated else 'dedicated'} servers "
          f"(ranks {raw['server_ranks']}), {hosts} hosts at {args.rate}, S = "
          f"{args.size / (1 << 20):g} MiB, partitions of {raw['partition_bytes']:,} bytes "
          f"({raw['partitions_per_server']} per server)")
    print(f"{'what':>22} {'median ms':>10} {'min-max ms':>16} {'bound ms':>9} {'x bound':>8}")
    for name, value, key, bound in [("PS push+pull", ps, "ps", ps_bound),
                                    ("gloo all-reduce", ar, "allreduce",
                                     bound_allreduce_s(args.size, n, args.rate))]:
        spread = raw["times"][key]
        ratio = f"{value / bound:>8.2f}" if bound else f"{'-':>8}"
        print(f"{name:>22} {1e3 * value:>10.1f} {1e3 * min(spread):>7.1f}-"
              f"{1e3 * max(spread):<8.1f} {1e3 * bound:>9.1f} {ratio}")
    print(f"# S/B = {1e3 * s_over_b:.1f} ms; PS / S/B = {ps / s_over_b:.2f}; "
          f"all-reduce / PS = {ar / ps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
