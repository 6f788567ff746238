"""`gradsync bench train`: training throughput across architectures and worker counts.

Every configuration is a real `gradsync train` run (its own processes, its own summary), so
what is measured is what users get. Throughput is the global batch over the median step
time, free of start-up and of the first slow steps. Baselines come from the same run: one
process alone (``local``, for scaling efficiency) and torch's DistributedDataParallel
(``ddp``). Rounds interleave the configurations, so a noisy neighbour slows all of them alike.

In a lab (``--lab-rate``) each configuration gets its own emulated cluster, one host per
process, and the table adds the communication lower bound of the configuration and the
measured step time as a multiple of it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .ranks import usage
from .report import bound_allreduce_s, bound_ps_s, machine_line, write_plot


@dataclass(frozen=True)
class Config:
    """One measured configuration: an architecture spec and a worker count."""

    spec: str       # "allreduce[:ALGO]", "zero:S", "ps:K", "ps:K:colocated", "ddp" or "local"
    workers: int

    @property
    def arch(self) -> str:
        return self.spec.split(":")[0]

    @property
    def servers(self) -> int:
        return int(self.spec.split(":")[1]) if self.arch == "ps" and ":" in self.spec else 1

    @property
    def colocated(self) -> bool:
        """ps:K:colocated: one server beside each worker, two ranks per lab host."""
        return self.arch == "ps" and self.spec.endswith(":colocated")

    def flags(self) -> list[str]:
        kind, _, arg = self.spec.partition(":")
        if kind == "allreduce":
            return ["--arch", "allreduce", "--algorithm", arg or "auto"]
        if kind == "zero":  # ZeRO stage S on the all-reduce architecture
            return ["--arch", "allreduce", "--zero", arg]
        if kind == "ps":
            return ["--arch", "ps", "--servers", str(self.servers)] + \
                ["--server-ranks", "colocated"] * self.colocated
        return ["--arch", kind]

    @property
    def processes(self) -> int:
        return self.workers + (self.servers if self.arch == "ps" else 0)

    @property
    def hosts(self) -> int:
        """Lab hosts: one per process, or one per worker when co-located."""
        return self.workers if self.colocated else self.processes


def run_config(config: Config, args, out: Path) -> dict:
    """One `gradsync train` run; returns its summary."""
    cmd = [sys.executable, "-m", "gradsync", "train", "--workload", args.workload, "--hidden",
           str(args.hidden), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--no-progress", "--out", str(out), *config.flags()]
    cmd += ["--workers", str(config.workers)]
    if args.compression != "none" and config.arch in ("allreduce", "ps"):
        cmd += ["--compression", args.compression]
    if args.ps_partition_mb and config.arch == "ps":
        cmd += ["--ps-partition-mb", str(args.ps_partition_mb)]
    if config.colocated and (args.lab_rate or args.lab_rates):
        return _run_colocated(config, args, cmd[3:], out)
    if args.lab_rates and config.arch == "local":
        pass  # one process alone: no links to shape
    elif args.lab_rates:  # one emulated host per process, each with its own link
        cmd += ["--lab", str(config.hosts), "--rates", args.lab_rates]
    elif args.lab_rate:  # one emulated host per process
        cmd += ["--lab", str(config.hosts), "--rate", args.lab_rate]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"gradsync bench: {config.spec} x{config.workers} failed:\n"
                         f"{done.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def _run_colocated(config: Config, args, argv: list[str], out: Path) -> dict:
    """`gradsync train` across a lab of one host per worker, each running a worker and a
    server (``--procs-per-host 2``, LOCAL_RANK 0 serves)."""
    from ..lab import lab_launch, up

    rates = args.lab_rates.split(",") if args.lab_rates else None
    env = {"OMP_NUM_THREADS": str(args.threads), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    lines: list[str] = []
    with up(config.hosts, args.lab_rate or "1gbit", rates, 2) as lab:
        rc = lab_launch(lab, argv, env=env,
                        on_line=lambda rank, stream, line: lines.append(f"[rank {rank}] {line}"))
    if rc != 0:
        raise SystemExit(f"gradsync bench: {config.spec} x{config.workers} failed:\n"
                         + "\n".join(lines[-20:]))
    return json.loads((out / "summary.json").read_text())


def measure(configs: list[Config], args) -> dict[Config, list[dict]]:
    results: dict[Config, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="gradsync-bench-train-") as tmp:
        for r in range(args.rounds):
            for i, config in enumerate(configs):
                out = Path(tmp) / f"{r}-{i}"
                results[config].append(run_config(config, args, out))
                print(f"# round {r + 1}/{args.rounds}: {config.spec} x{config.workers} "
                      f"{results[config][-1]['samples_per_s_median_step']:,.0f} samples/s",
                      file=sys.stderr, flush=True)
    return results


def table(results: dict[Config, list[dict]], args) -> list[dict]:
    """One row per configuration: medians over rounds, efficiency and ratios."""
    def median(config, key):
        return statistics.median(s[key] for s in results[config])

    local = [c for c in results if c.arch == "local"]
    base = median(local[0], "samples_per_s_median_step") if local else None
    rows = []
    for config, runs in results.items():
        thr = median(config, "samples_per_s_median_step")
        spread = [s["samples_per_s_median_step"] for s in runs]
        ddp = [c for c in results if c.arch == "ddp" and c.workers == config.workers]
        step_s = median(config, "step_time_ms_median") / 1e3
        runs_steps = [max(r["steps_run"], 1) for r in runs]
        # Per step, so that the user sees why compression pays or does not: the time waiting
        # on communication that backward did not hide, and the time spent compressing.
        comm_ms = statistics.median(1e3 * r["comm_wait_s"] / n for r, n in zip(runs, runs_steps))
        compress_ms = statistics.median(1e3 * r.get("compress_s", 0.0) / n
                                        for r, n in zip(runs, runs_steps))
        row = {"arch": config.spec, "workers": config.workers, "samples_per_s": thr,
               "comm_ms": comm_ms, "compress_ms": compress_ms,
               "min": min(spread), "max": max(spread), "step_ms": 1e3 * step_s,
               "efficiency": thr / (config.workers * base) if base else None,
               "vs_ddp": thr / median(ddp[0], "samples_per_s_median_step") if ddp else None,
               "bytes_per_step": runs[0]["bytes_per_step_per_worker"],
               "parameters": runs[0]["parameters"]}
        if args.lab_rate and not args.lab_rates and config.arch != "local":
            nbytes = 4 * runs[0]["parameters"]
            # co-located servers: BytePS's bound is all-reduce's; ZeRO stages 1-2 move
            # all-reduce's bytes (reduce-scatter + all-gather), stage 3 1.5x (the parameters
            # all-gathered twice, ZeRO's section 7)
            bound = (bound_ps_s(nbytes, config.workers, config.servers, args.lab_rate)
                     if config.arch == "ps" and not config.colocated
                     else bound_allreduce_s(nbytes, config.workers, args.lab_rate)
                     * (1.5 if config.spec == "zero:3" else 1.0))
            row["bound_ms"], row["vs_bound"] = 1e3 * bound, step_s / bound
        rows.append(row)
    return rows


def print_table(rows: list[dict], lab: bool) -> None:
    head = (f"{'arch':>16} {'workers':>7} {'samples/s':>10} {'(min-max)':>17} {'step ms':>8} "
            f"{'eff.':>6} {'vs ddp':>7} {'comm ms':>8} {'compr ms':>8}")
    print(head + (f" {'bound ms':>9} {'x bound':>8}" if lab else ""))
    for r in rows:
        line = (f"{r['arch']:>16} {r['workers']:>7} {r['samples_per_s']:>10,.0f} "
                f"{r['min']:>8,.0f}-{r['max']:<8,.0f} {r['step_ms']:>8.1f} "
                f"{_opt(r['efficiency'], '.2f'):>6} {_opt(r['vs_ddp'], '.2f'):>7} "
                f"{r['comm_ms']:>8.1f} {r['compress_ms']:>8.2f}")
        if lab:
            line += f" {_opt(r.get('bound_ms'), '.1f'):>9} {_opt(r.get('vs_bound'), '.2f'):>8}"
        print(line)


def _opt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="training throughput across architectures",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="synthetic-mlp")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--steps", type=int, default=40, help="steps per run")
    p.add_argument("--workers", default="2", help="worker counts, e.g. 1,2,3")
    p.add_argument("--archs", default="allreduce,ddp",
                   help="comma-separated: allreduce[:ALGO], zero:S (ZeRO stage S), ps:K (K "
                        "dedicated servers), "
                        "ps:K:colocated (a server beside each worker, K = workers, "
                        "needs --lab-rate), ddp (local is always added)")
    p.add_argument("--ps-partition-mb", type=float, default=None,
                   help="--ps-partition-mb for the ps runs (default: the PS's own choice)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--lab-rate", metavar="RATE",
                   help="run each configuration in an emulated cluster with links of RATE")
    p.add_argument("--compression", default="none",
                   help="--compression for the allreduce and ps runs (fp16, topk:0.01, ...)")
    p.add_argument("--lab-rates", metavar="R1,R2,...",
                   help="one rate per emulated host instead (unequal links); every "
                        "configuration then needs that many processes")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(bench=main)


def main(args) -> int:
    try:
        counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        return usage(f"--workers {args.workers!r}: expected numbers like 1,2,3")
    if min(counts) < 1 or args.rounds < 1 or args.steps < 2:
        return usage("--workers and --rounds must be >= 1 and --steps >= 2")
    specs = [s for s in args.archs.split(",") if s and s != "local"]
    configs = [Config("local", 1)] + [Config(s, n) for n in counts for s in specs]
    for c in configs:
        if c.colocated and (c.servers != c.workers or not (args.lab_rate or args.lab_rates)):
            return usage(f"{c.spec} x{c.workers}: a co-located server sits beside each worker "
                         "of a lab host: K must equal the workers, with --lab-rate")
    if args.lab_rates:  # local runs alone, outside the lab; the others need one host each
        hosts = len(args.lab_rates.split(","))
        wrong = [f"{c.spec} x{c.workers}" for c in configs[1:] if c.hosts != hosts]
        if wrong:
            return usage(f"--lab-rates gives {hosts} hosts but {', '.join(wrong)} "
                          f"need(s) another number of processes")
    print(f"# {' '.join(['gradsync', *sys.argv[1:]])}")
    print(f"# {machine_line()}")
    results = measure(configs, args)
    rows = table(results, args)
    print_table(rows, bool(args.lab_rate and not args.lab_rates))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args) | {"bench": None},
                                               "machine": machine_line()}, indent=2) + "\n")
    if args.plot:
        write_plot(args.plot, rows)
    return 0
