"""Checkpoints in the training loop: when to save, what goes in, and resuming exactly.

What a checkpoint holds: the model and optimizer state, the step, the epoch and how many of
this rank's samples of that epoch were consumed, and every rank's RNG streams. Saving is
collective: every rank writes its files, a barrier, then rank 0 commits. Loading is agreed
once: rank 0 picks the newest checkpoint that verifies and broadcasts its step, so no rank can
resume from a different one. A checkpoint written with another number of workers resumes the
All-Reduce architecture too (its state is replicated), continuing at the same fraction of the
epoch, but then without the per-rank RNG streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import comm
from .checkpoint import CheckpointManager, CheckpointMeta, model_fingerprint
from .rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: completed steps, current epoch, samples consumed in it."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0


class Checkpointer:
    """Save and restore training state for the ranks of ``group``.

    Args:
        directory: where checkpoints live; ``every``: save each this many steps (None: never).
        keep: committed checkpoints to keep.
        group: the ranks that train (all of them write their RNG state).
    """

    def __init__(self, directory: str, every: int | None, keep: int, group: comm.Group,
                 workload: str, arch: str, model: torch.nn.Module):
        self.every = every
        self.group = group
        self.manager = CheckpointManager(directory, keep=keep, rank=group.rank)
        self.workload, self.arch = workload, arch
        self.fingerprint = model_fingerprint(model)

    def _meta(self, pos: Position) -> CheckpointMeta:
        return CheckpointMeta(pos.step, pos.epoch, self.workload, self.group.size, self.arch,
                              self.fingerprint)

    def maybe_save(self, pos: Position, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> None:
        if self.every is None or pos.step % self.every:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "position": [pos.step, pos.epoch, pos.consumed]}
        self.manager.save_rank_files(pos.step, state if self.group.rank == 0 else None,
                                     per_rank=capture_rng_state())
        comm.barrier(self.group)  # every rank's files are on disk before rank 0 commits
        if self.group.rank == 0:
            self.manager.commit(pos.step, self._meta(pos))
        comm.barrier(self.group)  # nobody races ahead to a step that might need the commit

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Position:
        """Load the newest valid checkpoint into ``model`` and ``optimizer``.

        Returns:
            The position to continue from (step 0 when there is no checkpoint).
        Raises:
            CheckpointError: the chosen checkpoint is of another run, or cannot be read.
        """
        expect = self._meta(Position())
        chosen = torch.tensor([-1], dtype=torch.int64)
        if self.group.rank == 0:
            found = self.manager.load_latest_valid(expect, allow_reshard=self.arch == "allreduce")
            chosen[0] = -1 if found is None else found[0]
        comm.broadcast(chosen, src=0, group=self.group)
        step = int(chosen.item())
        if step < 0:
            log.info("no checkpoint to resume from; starting afresh")
            return Position()
        state, per_rank, meta = self.manager.load(step, expect=expect,
                                                  allow_reshard=self.arch == "allreduce")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pos = Position(*state["position"])
        if meta.world_size == self.group.size and per_rank is not None:
            restore_rng_state(per_rank)
        else:
            # Same share of the epoch, counted on the new number of ranks.
            pos.consumed = pos.consumed * meta.world_size // self.group.size
        log.info("resumed from step %d (epoch %d)", pos.step, pos.epoch)
        return pos
