"""What `gradsync plan` prints: the ranking, the best configuration's flags, the scaling
table (and its plot)."""

from __future__ import annotations

import math

from ..comm.cost_model import DEFAULT_COST_MODEL, CostModel
from .cluster import Cluster
from .machine import DEFAULT
from .predict import Candidate, Prediction, predict
from .profile import Profile


def print_table(profile: Profile, cluster: Cluster, preds: list[Prediction]) -> None:
    print(f"# {profile.workload}, batch {profile.batch} per worker: data "
          f"{1e3 * profile.data_s:.2f} ms, forward "
          f"{1e3 * profile.forward_s:.2f} ms, backward {1e3 * profile.backward_s:.2f} ms, "
          f"optimizer {1e3 * profile.optimizer_s:.2f} ms, gradients "
          f"{profile.grad_bytes / 1e6:.3f} MB (measured here, one thread)")
    slow = cluster.slowdown()
    print(f"# cluster: {cluster.describe()}"
          + (f"; {cluster.ranks} ranks share {cluster.cores} cores (compute x{slow:.2f})"
             if slow > 1 else ""))
    if cluster.cores and cluster.hosts > 1:
        hint = ("; `gradsync plan --lab --calibrate` measures this machine's (root)"
                if cluster.machine == DEFAULT else "")
        print(f"# shared-core constants: {cluster.machine.source}{hint}")
    print(f"{'':3}{'configuration':28} {'workers':>7} {'step ms':>9} {'samples/s':>10} "
          f"{'exposed ms':>10}  bottleneck")
    for i, p in enumerate(preds, 1):
        print(f"{i:<3}{p.candidate.label:28} {p.workers:>7} {1e3 * p.step_s:9.2f} "
              f"{p.samples_per_s(profile.batch):10.0f} {1e3 * p.exposed_s:10.2f}  "
              f"{p.bottleneck}")


def emit_flags(best: Prediction, cluster: Cluster, config, profile: Profile) -> list[str]:
    """`gradsync train` flags that run ``best`` on ``cluster`` (the workers count, or the lab)
    with the profiled workload and batch."""
    flags = [*workload_flags(profile), *best.candidate.flags()]
    if cluster.hosts == 1:
        return flags + ["--workers", str(best.workers)]
    if config.lab:
        return flags + lab_flags(cluster, config.rates or ",".join([config.rate] * cluster.hosts))
    return flags  # across real hosts: with torchrun / gradsync run's own world flags


def lab_flags(cluster: Cluster, rates: str) -> list[str]:
    """`gradsync train`'s flags for a lab of ``cluster``'s hosts (``rates``: one per host,
    comma-separated) and ranks per host."""
    per = ["--procs-per-host", str(cluster.procs_per_host)] if cluster.procs_per_host > 1 else []
    return ["--lab", str(cluster.hosts), "--rates", rates, *per]


def workload_flags(profile: Profile) -> list[str]:
    return ["--workload", profile.workload, "--batch-size", str(profile.batch),
            "--hidden", str(profile.hidden)]


def print_scaling(profile: Profile, cluster: Cluster, plot: str | None) -> None:
    rate, L = min(cluster.rates), cluster.procs_per_host
    rows = scaling(profile, rate, L, cluster.latency_s)
    alone = profile.compute_s
    print(f"\n# scaling: hosts of {L} ranks, {rate * 8 / 1e6:g} Mbit/s links; efficiency = "
          f"samples/s over (workers x one process's)")
    print(f"{'workers':>7}  {'all-reduce':24} {'step ms':>8} {'eff':>5}   {'ps':10} "
          f"{'step ms':>8} {'eff':>5}")
    for p, ar, ps in rows:
        def eff(q: Prediction) -> float:
            return (q.workers / q.step_s) / (p / alone)
        print(f"{p:>7}  {ar.candidate.label:24} {1e3 * ar.step_s:8.2f} {eff(ar):5.2f}   "
              f"{ps.candidate.label:10} {1e3 * ps.step_s:8.2f} {eff(ps):5.2f}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p for p, _, _ in rows]
        for label, idx in (("all-reduce", 1), ("parameter server", 2)):
            ax.plot(xs, [r[idx].workers * profile.batch / r[idx].step_s for r in rows],
                    marker="o", label=label)
        ax.plot(xs, [p * profile.batch / alone for p in xs], ls="--", c="gray", label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("samples/s (predicted)")
        ax.set_title(f"{profile.workload}: {rate * 8 / 1e6:g} Mbit/s, {L} ranks per host")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"# plot: {plot}")


def scaling(profile: Profile, rate: float, procs_per_host: int, latency_s: float,
            sizes: list[int] | None = None, cost: CostModel = DEFAULT_COST_MODEL
            ) -> list[tuple[int, Prediction, Prediction]]:
    """For 2 .. 1,024 workers on hosts of ``procs_per_host`` ranks and ``rate`` links: the best
    all-reduce (hierarchical across hosts) and the best PS (k = hosts' worth of servers in
    powers of two), each as a Prediction."""
    sizes = sizes or [2 ** i for i in range(1, 11)]
    out = []
    for p in sizes:
        hosts = max(1, math.ceil(p / procs_per_host))
        cluster = Cluster((rate,) * hosts, min(procs_per_host, p), latency_s)
        algos = ["native"] + (["hierarchical"] if cluster.hosts > 1 and
                              cluster.procs_per_host > 1 else [])
        ar = min((predict(profile, cluster, Candidate("allreduce", a), cost) for a in algos),
                 key=lambda q: q.step_s)
        ks = [2 ** i for i in range(0, int(math.log2(max(cluster.ranks // 2, 1))) + 1)]
        ps = max((predict(profile, cluster, Candidate("ps", servers=k), cost) for k in ks),
                 key=lambda q: q.samples_per_s(profile.batch))
        out.append((p, ar, ps))
    return out
