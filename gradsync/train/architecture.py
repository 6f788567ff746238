"""What the trainer asks of an architecture, and the one table that maps ``--arch`` to one.

The trainer never learns which architecture runs it: it hands over the model and a way to
build the optimizer, then trains what it gets back. Ranks that are not workers (the servers
of the Parameter Server) are handed the model to ``serve`` instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .. import comm
from ..exits import under_launcher

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Architecture(Protocol):
    name: str
    group: comm.Group               # every rank of the run; each writes its checkpoint file
    is_worker: bool                 # False: this rank serves instead of training
    worker_rank: int                # position among the workers (data shard index)
    num_workers: int
    eval_group: comm.Group | None   # workers that evaluate together; None: worker 0 alone
    committer: int                  # the rank that writes the replicated state and commits
    checkpoint_tag: str             # what a checkpoint must have been written by to resume
    replicated: bool                # every worker holds all state: resumable on another count

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory, start_step: int = 0
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Return the model to train and the optimizer whose ``step()`` updates it;
        ``start_step`` steps were taken before (a resumed run)."""

    def serve(self, model: nn.Module, make_optimizer: OptimizerFactory,
              save: Callable[[int, dict], None] | None = None,
              restored: dict | None = None) -> object:
        """Non-worker ranks: serve until the workers are done. ``save(step, state)`` writes
        this rank's state into checkpoint ``step``; ``restored`` is the state to resume."""

    def commit_checkpoint(self, step: int, commit: Callable[[], None], written: bool = True
                          ) -> None:
        """On every worker, after it wrote its files of checkpoint ``step`` (``written``
        False: writing failed, and the caller raises that error next): once every rank's
        files are on disk, call ``commit`` on the committer. Raises CheckpointRefusedError
        on a rank whose files were written when another rank's were not."""

    def comm_wait_s(self) -> float:
        """Seconds spent waiting on communication that did not overlap computation."""

    def bytes_sent(self) -> int | None:
        """Bytes this rank has sent so far (None: not known)."""

    def compress_s(self) -> float:
        """Seconds spent compressing and decompressing gradients so far (0 without
        compression)."""

    def finish(self) -> dict:
        """After the last step: architecture-specific figures for the summary."""

    def summary_head(self, summary: dict) -> str:
        """How this run synchronised, for the summary's first line ("ps, 2 servers, sync")."""

    def summary_lines(self, summary: dict) -> list[str]:
        """The summary's lines of this architecture's own figures (may be empty)."""


@dataclass(frozen=True)
class ArchitectureEntry:
    """One ``--arch``: where its class lives (imported only by a run that uses it) and what
    ``--help`` says of it. The class builds itself from the config
    (``from_config(config, group, links)``) and writes its own summary lines."""

    name: str
    path: str       # "module:Class" under gradsync
    help: str
    baseline: bool = False  # for comparison in benchmarks, not a gradsync architecture

    def load(self) -> type:
        module, _, cls = self.path.partition(":")
        return getattr(importlib.import_module(f"gradsync.{module}"), cls)


# The one table of architectures: a new one is one file (a class with this module's
# interface, ``from_config`` and the summary methods) plus one line here.
REGISTRY: dict[str, ArchitectureEntry] = {e.name: e for e in (
    ArchitectureEntry("allreduce", "allreduce.architecture:AllReduceArchitecture",
                      "every rank a worker; gradients averaged while backward runs"),
    ArchitectureEntry("ps", "ps.architecture:PSArchitecture",
                      "parameter servers hold shards; workers push gradients, pull parameters"),
    ArchitectureEntry("ddp", "allreduce.architecture:BaselineArchitecture",
                      "torch's DistributedDataParallel", baseline=True),
    ArchitectureEntry("local", "allreduce.architecture:BaselineArchitecture",
                      "one process, no wrapper", baseline=True),
)}
ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)
AUTO = "auto"
"""Not an architecture: ``--arch auto`` has the launcher plan at start-up and run the best
configuration of the table's (train/auto.py); the ranks never see it."""
ARCH_HELP = (
    "architecture: " + ", ".join(n for n, e in REGISTRY.items() if not e.baseline)
    + "; baselines for comparison: " + ", ".join(
        f"{n} ({e.help})" for n, e in REGISTRY.items() if e.baseline)
    + f"; {AUTO}: plan at start-up and run the best (docs/plan.md)")


def check_architecture(name: str) -> ArchitectureEntry:
    """The table's entry for ``--arch name``; ValueError listing them otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown --arch {name!r}; choose one of {', '.join(ARCHITECTURES)}"
                         f", or {AUTO}")
    return REGISTRY[name]


def check_auto(config) -> None:
    """What ``--arch auto`` cannot plan for in ``config`` (a TrainConfig), each a one-line
    ValueError. (The flags auto reads as restrictions, e.g. --compression: train/auto.py.)"""

    refusals = (
        (under_launcher(), "is chosen by gradsync's own launcher before the ranks start; under "
                           "torchrun or mpiexec pass the flags `gradsync plan --emit flags` prints"),
        (config.launch.elastic, "plans for a fixed set of ranks; with --elastic pass --arch "
                                "allreduce or --arch ps (`gradsync plan` ranks them)"),
        (config.launch.engine == "mpi", "predicts gloo's algorithms; with --engine mpi pass "
                                        "--arch allreduce or --arch ps"),
        (config.ps.consistency != "sync", "predicts synchronous training; --consistency "
                                          f"{config.ps.consistency} needs --arch ps"),
        (config.ps.server_ranks is not None, "places a PS's servers on the first ranks; "
                                             "--server-ranks needs --arch ps"),
        (config.checkpoint.resume, "may choose another configuration than the one that wrote "
                                   "the checkpoint; with --resume pass that run's --arch flags"),
    )
    for refused, why in refusals:
        if refused:
            raise ValueError(f"--arch {AUTO} {why}")


def build_architecture(config: "TrainConfig", group: comm.Group,
                       links: comm.Topology | None = None) -> Architecture:
    """The architecture ``config.arch`` names, on ``group`` (``config``: a TrainConfig).
    ``links``: the run's hosts and links when the caller knows them (a lab's)."""
    return check_architecture(config.arch).load().from_config(config, group, links)
