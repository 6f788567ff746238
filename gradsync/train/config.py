"""The typed configuration of `gradsync train`; its flags are derived from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..comm import ALL_REDUCE_ALGORITHMS, check_algorithm
from .workloads import WORKLOADS

ARCHITECTURES = ("allreduce", "ps", "ddp", "local")  # the last two: baselines
# Upper bounds of the positive float flags: beyond them a value is a typo, not a setting
# (a learning rate of 1e300 turns the first update into Inf; a timeout beyond a week
# overflows the engine's timedelta long before it helps anyone).
LIMITS = {"lr": 1e3, "timeout": 7 * 24 * 3600.0, "bucket_cap_mb": 1 << 20}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """What to train, on how many workers, with which architecture."""

    workload: str = field(default="digits-mlp", metadata=_help(
        f"what to train: {', '.join(WORKLOADS)}"))
    workers: int = field(default=2, metadata=_help("local worker processes (ignored under "
                                                   "torchrun, which sets the world size)"))
    arch: str = field(default="allreduce", metadata=_help(
        "architecture: allreduce, ps; baselines for comparison: ddp (torch's "
        "DistributedDataParallel), local (one process, no wrapper)"))
    servers: int = field(default=1, metadata=_help("parameter servers (--arch ps); the first "
                                                   "ranks of the world serve"))
    consistency: Literal["sync", "async", "ssp"] = field(default="sync", metadata=_help(
        "parameter-server consistency: sync, async, or ssp (bounded staleness)"))
    staleness: int = field(default=2, metadata=_help("ssp: how many steps a worker may run "
                                                     "ahead of the slowest"))
    algorithm: str = field(default="auto", metadata=_help(
        f"all-reduce algorithm: {', '.join(ALL_REDUCE_ALGORITHMS)}"))
    epochs: int | None = field(default=None, metadata=_help("passes over the training data "
                                                            "(default: the workload's)"))
    steps: int | None = field(default=None, metadata=_help("stop after this many steps "
                                                           "(overrides --epochs)"))
    batch_size: int | None = field(default=None, metadata=_help(
        "samples per worker per step (default: the workload's)"))
    lr: float | None = field(default=None, metadata=_help("learning rate (default: the "
                                                          "workload's)"))
    seed: int = field(default=0, metadata=_help("seed for the model and the data order"))
    hidden: int = field(default=1024, metadata=_help("hidden width of synthetic-mlp"))
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=_help(
        "parameter and data type"))
    bucket_cap_mb: float = field(default=25.0, metadata=_help("gradient bucket size (MiB)"))
    checkpoint_dir: str | None = field(default=None, metadata=_help(
        "directory for checkpoints (atomic; see docs/reliability.md)"))
    checkpoint_every: int | None = field(default=None, metadata=_help(
        "save a checkpoint every this many steps"))
    keep: int = field(default=3, metadata=_help("committed checkpoints to keep"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest valid checkpoint in --checkpoint-dir"))
    overwrite: bool = field(default=False, metadata=_help(
        "start afresh in a --checkpoint-dir that holds checkpoints, removing them"))
    on_nonfinite: Literal["error", "skip"] = field(default="error", metadata=_help(
        "a NaN or Inf gradient: stop the run naming the rank and step (error), or skip "
        "that step's update (skip)"))
    out: str | None = field(default=None, metadata=_help(
        "directory for metrics.jsonl (per step) and summary.json"))
    timeout: float = field(default=300.0, metadata=_help(
        "seconds any blocking communication may wait before the run fails"))
    addr: str = field(default="127.0.0.1", metadata=_help("rendezvous address of local runs"))
    port: int | None = field(default=None, metadata=_help("rendezvous port (default: a free "
                                                          "one)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar on rank 0"))
    lab: int | None = field(default=None, metadata=_help(
        "run on N emulated hosts with shaped links, one rank each (root; docs/lab.md); "
        "--workers is then N, or N minus the servers"))
    rate: str = field(default="1gbit", metadata=_help("--lab: every link's rate (tc units)"))
    rates: str | None = field(default=None, metadata=_help(
        "--lab: one rate per host, e.g. 1gbit,1gbit,250mbit"))

    @property
    def processes(self) -> int:
        """Local processes to start: the workers, plus the servers of the Parameter Server."""
        return self.workers + (self.servers if self.arch == "ps" else 0)

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of "
                             f"{', '.join(WORKLOADS)}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of "
                             f"{', '.join(ARCHITECTURES)}")
        check_algorithm(self.algorithm)
        if self.arch == "local" and self.workers != 1:
            raise ValueError(f"--arch local trains one process alone; use --workers 1, "
                             f"not {self.workers}")
        if self.staleness < 0:
            raise ValueError(f"--staleness must be at least 0, got {self.staleness}")
        if self.lab is not None and self.lab < 1:
            raise ValueError(f"--lab must be at least 1 host, got {self.lab}")
        if self.rates is not None and self.lab is not None \
                and len(self.rates.split(",")) != self.lab:
            raise ValueError(f"--rates lists {len(self.rates.split(','))} rates for "
                             f"{self.lab} hosts")
        if (self.checkpoint_every is not None or self.resume or self.overwrite) \
                and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every, --resume and --overwrite need --checkpoint-dir")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the checkpoints that --overwrite would "
                             "remove; pass one of them")
        for name in ("workers", "servers", "epochs", "steps", "batch_size", "hidden",
                     "checkpoint_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not 0 < value <= most:  # (also false for NaN)
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number up to "
                                 f"{most:g}, got {value}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
