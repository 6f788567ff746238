"""`gradsync train --arch auto`: plan at start-up, in the launcher, before the ranks start.

    gradsync train --arch auto --workload digits-wide --workers 4
    gradsync train --arch auto --lab 3 --rates 1gbit,1gbit,100mbit

The launcher measures the run's workload once in its own process (gradsync plan's profile,
fewer repetitions), describes the run's cluster (this machine with --workers ranks; the lab's
hosts and links; or the --topology file's), predicts every configuration the run can run,
and hands the ranks the best one's flags: they never see ``auto``. One line says what it
chose and why; summary.json records it under "auto".

What the user set stays: the workload, its batch and width, --workers (a PS on one host
starts its servers beside them, as ``--arch ps`` does). Flags away from their defaults
restrict the choice: --compression X (only X), --algorithm A (only all-reduce with A),
--servers k (only the PS with k servers). A --topology file plans all-reduce only (a PS's
servers would be ranks the file does not describe). What auto refuses outright is
architecture.check_auto's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..exits import UserError, say
from .config import AllReduceConfig, PSConfig, TrainConfig

PROFILE_STEPS = 6  # plan's default is 12: a few seconds at most at start-up


def resolve(config: TrainConfig):
    """The config with ``--arch auto`` replaced by the best configuration, and the
    :class:`gradsync.plan.Choice` behind it; says the one line. Raises UserError."""
    from ..plan import choose, measure
    from ..plan.profile import CODECS

    cluster, where, extra_servers = _cluster(config)
    spec = str(config.compression.spec)
    restrict = {
        "compression": None if spec == "none" else spec,
        "algorithm": None if config.allreduce.algorithm == AllReduceConfig.algorithm
        else config.allreduce.algorithm,
        "servers": None if config.ps.servers == PSConfig.servers else config.ps.servers,
        "arch": "allreduce" if _topology_file(config) else "any",
    }
    profile = measure(config.workload.workload, config.optim.batch_size,
                      hidden=config.workload.hidden, steps=PROFILE_STEPS,
                      specs=(spec,) if restrict["compression"] else CODECS)
    try:
        choice = choose(profile, cluster, extra_servers=extra_servers, **restrict)
    except ValueError as exc:
        raise UserError(f"--arch auto: {exc}") from None
    choice = replace(choice, cluster=where)
    say(f"gradsync: {choice.line()}")
    return _apply(config, choice.candidate), choice


def _apply(config: TrainConfig, cand) -> TrainConfig:
    """``config`` running ``cand`` (a plan Candidate); validated again as a whole."""
    allreduce = replace(config.allreduce, algorithm=cand.algorithm) \
        if cand.arch == "allreduce" else config.allreduce
    ps = replace(config.ps, servers=cand.servers) if cand.arch == "ps" else config.ps
    compression = replace(config.compression, compression=cand.compression)
    try:
        return replace(config, arch=cand.arch, allreduce=allreduce, ps=ps,
                       compression=compression)
    except ValueError as exc:
        raise UserError(f"--arch auto chose {cand.label}, which this run refuses: {exc}") \
            from None


def _topology_file(config: TrainConfig) -> str | None:
    return None if config.allreduce.topology in ("probe", "off") else config.allreduce.topology


def _cluster(config: TrainConfig):
    """(the plan's Cluster, a few words for the line, whether a PS adds its servers)."""
    from ..comm import Topology
    from ..plan import Cluster

    lab = config.lab
    if lab.hosts:
        rates = lab.rates or ",".join([lab.rate] * lab.hosts)
        cluster = Cluster.parse(lab.hosts, lab.procs_per_host, rates=rates, shared=True)
        per = f" x {lab.procs_per_host} ranks" if lab.procs_per_host > 1 else ""
        return cluster, f"a lab of {lab.hosts} hosts{per} ({rates})", False
    path, workers = _topology_file(config), config.launch.workers
    if path:
        try:
            cluster = Cluster.from_topology(Topology.load(path), shared=True)
        except ValueError as exc:
            raise UserError(f"--arch auto --topology {path}: {exc}") from None
        if cluster.ranks != workers:
            raise UserError(f"--arch auto: --topology {path} describes {cluster.ranks} ranks, "
                            f"the run has --workers {workers}")
        return cluster, f"{cluster.describe()} (--topology {path})", False
    return Cluster.parse(1, workers, shared=True), f"this machine, {workers} workers", True


def record(out: str | None, choice) -> None:
    """Add the choice to ``out``/summary.json under "auto" (rank 0 wrote the rest),
    replaced atomically as rank 0 writes it."""
    path = Path(out or "") / "summary.json"
    if not out or not path.exists():
        return
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary["auto"] = choice.record()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
