"""What the trainer asks of an architecture, and the registry that maps ``--arch`` to one.

The trainer never learns which architecture runs it: it hands over the model and a way to
build the optimizer, then trains what it gets back. Ranks that are not workers (the servers
of the Parameter Server) are handed the model to ``serve`` instead.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .. import comm
from .config import TrainConfig

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


def _allreduce(config: TrainConfig, group: comm.Group) -> Architecture:
    from ..allreduce.architecture import AllReduceArchitecture

    return AllReduceArchitecture(group, algorithm=config.allreduce.algorithm,
                                 bucket_cap_mb=config.allreduce.bucket_cap_mb,
                                 nonfinite=config.optim.on_nonfinite,
                                 topology=config.allreduce.topology,
                                 compression=config.compression.compression,
                                 compression_warmup=config.compression.compression_warmup)


def _baseline(config: TrainConfig, group: comm.Group) -> Architecture:
    from ..allreduce.architecture import BaselineArchitecture

    return BaselineArchitecture(config.arch, group, bucket_cap_mb=config.allreduce.bucket_cap_mb,
                                compression=config.compression.compression,
                                compression_warmup=config.compression.compression_warmup)


def _ps(config: TrainConfig, group: comm.Group) -> Architecture:
    from ..ps import PSArchitecture

    return PSArchitecture(config.ps.servers, config.ps.consistency, config.ps.staleness, group,
                          nonfinite=config.optim.on_nonfinite,
                          compression=config.compression.compression,
                          compression_warmup=config.compression.compression_warmup,
                          server_ranks=config.ps.server_ranks,
                          partition_mb=config.ps.partition_mb,
                          topology=config.allreduce.topology,
                          elastic=config.launch.elastic, min_workers=config.launch.min_workers)


# --arch name -> builder; the architectures import lazily, so a run loads only its own.
REGISTRY: dict[str, Callable[[TrainConfig, comm.Group], Architecture]] = {
    "allreduce": _allreduce, "ps": _ps, "ddp": _baseline, "local": _baseline}


def build_architecture(config: TrainConfig, group: comm.Group) -> Architecture:
    if config.arch not in REGISTRY:
        raise ValueError(f"unknown architecture {config.arch!r}")
    return REGISTRY[config.arch](config, group)
