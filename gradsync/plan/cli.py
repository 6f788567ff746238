"""`gradsync plan`: which architecture, algorithm and compression for this model on that
cluster, predicted from one local measurement.

    gradsync plan --workload digits-wide --hosts 4 --rates 1gbit,1gbit,1gbit,100mbit
    gradsync plan --workload synthetic-mlp --hosts 64 --procs-per-host 8 --rate 10gbit --scaling
    gradsync plan --lab --hosts 3 --rate 100mbit --emit flags      # the best one's flags
    gradsync plan --lab --hosts 3 --rate 100mbit --validate --top 5  # run them (root)
    gradsync plan --lab --calibrate --hosts 3 --rate 100mbit         # this machine's constants

The model: predict.py; the measurement: profile.py; docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from typing import Literal

from ..exits import UserError
from ..flags import add_dataclass_arguments, config_from_args
from ..flags import flag_meta as _help
from ..workloads import WORKLOADS


@dataclass
class PlanConfig:
    """What to plan for."""

    workload: Literal[tuple(WORKLOADS)] = field(default="digits-mlp", metadata=_help(
        "the built-in workload to measure"))
    batch_size: int | None = field(default=None, metadata=_help(
        "samples per worker per step (default: the workload's)"))
    hidden: int = field(default=1024, metadata=_help("synthetic-mlp / digits-wide width"))
    hosts: int = field(default=1, metadata=_help("hosts of the cluster"))
    procs_per_host: int = field(default=2, metadata=_help("ranks per host"))
    rate: str = field(default="1gbit", metadata=_help("every host's link (tc units)"))
    rates: str | None = field(default=None, metadata=_help("one rate per host, comma-separated"))
    latency_us: float = field(default=50.0, metadata=_help("one-way latency between hosts"))
    lab: bool = field(default=False, metadata=_help(
        "the cluster is `gradsync lab`'s on this machine: its ranks share these cores, and "
        "--validate runs there"))
    calibrate: bool = field(default=False, metadata=_help(
        "with --lab: first measure this machine's shared-core constants in a short lab sweep "
        "(root; a minute or two) and keep them for later plans (docs/plan.md)"))
    compression: bool = field(default=True, metadata=_help("also rank compressed configurations"))
    arch: Literal["any", "allreduce", "ps"] = field(default="any", metadata=_help(
        "rank only this architecture's configurations"))
    top: int = field(default=10, metadata=_help("rows shown (and run by --validate)"))
    emit: Literal["table", "flags", "json"] = field(default="table", metadata=_help(
        "table: the ranking; flags: the best configuration's `gradsync train` flags; json"))
    scaling: bool = field(default=False, metadata=_help(
        "also predict 2 .. 1,024 workers on hosts like these"))
    plot: str | None = field(default=None, metadata=_help("with --scaling: write a PNG plot"))
    profile: str | None = field(default=None, metadata=_help("read the measurement from a file"))
    save_profile: str | None = field(default=None, metadata=_help("write the measurement"))
    validate: bool = field(default=False, metadata=_help(
        "run the --top configurations and print predicted vs measured"))
    steps: int = field(default=60, metadata=_help("--validate: steps per run"))

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.procs_per_host < 1 or self.top < 1 or self.steps < 5:
            raise ValueError("--hosts, --procs-per-host and --top must be >= 1, --steps >= 5")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.calibrate and not self.lab:
            raise ValueError("--calibrate measures the constants of a lab on this machine: "
                             "add --lab")
        if self.validate and self.hosts > 1 and not self.lab:
            raise ValueError("--validate runs on this machine (--hosts 1) or in a lab (--lab)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="predict each configuration's step time and pick the best",
        description="Measure a workload once on this machine and predict the step time of "
                    "every configuration gradsync can run on the described cluster.")
    add_dataclass_arguments(p, PlanConfig)
    return p


def _calibrate(profile):
    """Measure and keep this machine's shared-core constants (calibrate.py); they are
    returned for this plan."""
    from .calibrate import calibrate
    from .machine import cache_path

    try:
        machine = calibrate(profile=profile)
    except RuntimeError as exc:
        raise UserError(f"--calibrate: {exc}") from None
    machine.save(cache_path())
    print(f"# kept in {cache_path()}\n")
    return machine


def main(args: argparse.Namespace) -> int:
    from .cluster import Cluster
    from .predict import candidates, rank
    from .profile import Profile, measure
    from .report import emit_flags, print_scaling, print_table

    config = config_from_args(PlanConfig, args)
    try:
        cluster = Cluster.parse(config.hosts, config.procs_per_host, config.rate, config.rates,
                                config.latency_us, shared=config.lab or config.hosts == 1)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.profile:
        try:
            profile = Profile.load(config.profile)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"--profile {config.profile}: cannot read it ({exc})") from None
    else:
        profile = measure(config.workload, config.batch_size, hidden=config.hidden,
                          loaded=config.lab)
    if config.save_profile:
        profile.save(config.save_profile)
    if config.calibrate:  # after the flags are checked: it takes minutes
        cluster = replace(cluster, machine=_calibrate(profile))
    cands = [c for c in candidates(cluster, profile, config.compression)
             if config.arch in ("any", c.arch)]
    preds = rank(profile, cluster, cands)
    if config.emit == "flags":
        print(" ".join(emit_flags(preds[0], cluster, config, profile)))
        return 0
    if config.emit == "json":
        json.dump([{"configuration": p.candidate.label, "flags": p.candidate.flags(),
                    "workers": p.workers, "step_s": p.step_s, "bottleneck": p.bottleneck,
                    "samples_per_s": p.samples_per_s(profile.batch)} for p in preds],
                  sys.stdout, indent=1)
        print()
        return 0
    print_table(profile, cluster, preds[:config.top])
    if config.scaling:
        print_scaling(profile, cluster, config.plot)
    if config.validate:
        from .validate import validate

        rates = config.rates.split(",") if config.rates else [config.rate] * config.hosts
        print()
        validate(profile, cluster, preds, config.top, config.steps, rates)
    return 0
