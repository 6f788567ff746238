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
from ..checkpoint import CheckpointRefusedError
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

    def finish(self) -> dict:
        """After the last step: architecture-specific figures for the summary."""


class AllReduceArchitecture:
    """Every process is a worker; gradients are averaged by :class:`gradsync.DataParallel`."""

    name = "allreduce"
    is_worker = True
    committer = 0
    replicated = True

    def __init__(self, config: TrainConfig, group: comm.Group):
        self.config = config
        self.group = group
        self.worker_rank = group.rank
        self.num_workers = group.size
        self.eval_group = group
        self.checkpoint_tag = config.arch
        self.model = None

    def prepare(self, model, make_optimizer, start_step=0):
        from ..allreduce import DataParallel

        ar = self.config.allreduce
        self.model = DataParallel(model, group=self.group, algorithm=ar.algorithm,
                                  bucket_cap_mb=ar.bucket_cap_mb,
                                  nonfinite=self.config.optim.on_nonfinite)
        return self.model, make_optimizer(self.model.parameters())

    def serve(self, model, make_optimizer, save=None, restored=None):
        raise RuntimeError("every rank of the All-Reduce architecture is a worker")

    def commit_checkpoint(self, step, commit, written=True):
        # Every rank's files are on disk before rank 0 commits, and the commit is done before
        # anyone goes on. A rank whose write failed (a full disk) says so in these two
        # exchanges instead of leaving, so that all stop together and it alone tells why.
        self._agree(written, f"could not write checkpoint step {step}")
        if written:
            committed = True
            if self.group.rank == 0:
                try:
                    commit()
                except Exception:
                    committed = False
                    self._agree(False, "")
                    raise
            self._agree(committed, f"could not commit checkpoint step {step}")

    def _agree(self, ok: bool, what: str) -> None:
        failed = torch.tensor([0 if ok else 1], dtype=torch.int64)
        comm.all_reduce(failed, op="sum", group=self.group, algorithm="native")
        if failed.item() and ok:
            raise CheckpointRefusedError(f"{failed.item()} rank(s) {what} (their error says why)")

    def comm_wait_s(self) -> float:
        return self.model.stats.comm_wait_s if self.model is not None else 0.0

    def bytes_sent(self) -> int:
        return self.group.stats.bytes_sent

    def finish(self) -> dict:
        return {"nonfinite_skipped": self.model.stats.skipped_steps if self.model else 0}


class BaselineArchitecture(AllReduceArchitecture):
    """Baselines for benchmarks: torch's own DDP (``ddp``), or no wrapper at all on a single
    process (``local``)."""

    def __init__(self, config: TrainConfig, group: comm.Group):
        super().__init__(config, group)
        self.name = config.arch
        if self.name == "local" and group.size != 1:
            raise ValueError(f"--arch local trains one process alone; the world has {group.size}")

    def prepare(self, model, make_optimizer, start_step=0):
        if self.name == "ddp":
            model = comm.reference.torch_ddp(model, self.group,
                                             self.config.allreduce.bucket_cap_mb)
        return model, make_optimizer(model.parameters())

    def comm_wait_s(self) -> float:
        return 0.0  # DDP's waits happen inside backward, out of sight

    def bytes_sent(self) -> int | None:
        return None if self.name == "ddp" else 0  # DDP's traffic is not visible to gradsync


def build_architecture(config: TrainConfig, group: comm.Group) -> Architecture:
    if config.arch == "allreduce":
        return AllReduceArchitecture(config, group)
    if config.arch in ("ddp", "local"):
        return BaselineArchitecture(config, group)
    if config.arch == "ps":
        from ..ps import PSArchitecture

        return PSArchitecture(config.ps.servers, config.ps.consistency, config.ps.staleness, group,
                              nonfinite=config.optim.on_nonfinite)
    raise ValueError(f"unknown architecture {config.arch!r}")
