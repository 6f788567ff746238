"""Checkpoints in the training loop: when to save, what goes in, and resuming exactly.

What a checkpoint holds: the model and optimizer state, the step, the epoch and how many of
this rank's samples of that epoch were consumed (written once, by the architecture's
committer), and every rank's RNG streams plus whatever state the rank holds alone (a
parameter server's shard and optimizer state). Saving is collective: every rank writes its
files, the architecture makes sure all are on disk (a barrier, or the servers' answers), then
the committer commits. Loading is agreed once: rank 0 picks the newest checkpoint that
verifies and broadcasts its step, so no rank can resume from a different one. A checkpoint
written with another number of workers resumes a replicated architecture (All-Reduce) too,
continuing at the same fraction of the epoch, but then without the per-rank RNG streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .. import comm
from .architecture import Architecture
from .checkpoint import (CheckpointError, CheckpointManager, CheckpointMeta,
                         CheckpointRefusedError, model_fingerprint)
from .rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

NONE, REFUSED = -1, -2  # what rank 0 broadcasts instead of a step


@dataclass
class Position:
    """Where training stands: completed steps, current epoch, samples consumed in it."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0


@dataclass
class Resumed:
    """The checkpoint all ranks agreed on, as this rank reads it."""

    position: Position
    state: dict[str, Any]            # the replicated state (model, optimizer, position)
    rank_state: dict[str, Any] | None  # what this rank alone holds, if it saved any


class Checkpointer:
    """Save and restore the training state of every rank of ``architecture.group``.

    Args:
        directory: where checkpoints live; ``every``: save each this many steps (None: never).
        keep: committed checkpoints to keep.
        architecture: decides who commits, what a checkpoint must match, and how the ranks
            know each other's files are on disk.
        model: the bare model (for the fingerprint that a resume must match).
    """

    def __init__(self, directory: str, every: int | None, keep: int,
                 architecture: Architecture, workload: str, model: torch.nn.Module):
        self.every = every
        self.architecture = architecture
        self.group = architecture.group
        self.manager = CheckpointManager(directory, keep=keep, rank=self.group.rank,
                                         committer=self.group.rank == architecture.committer)
        self.workload = workload
        self.fingerprint = model_fingerprint(model)

    def _meta(self, pos: Position) -> CheckpointMeta:
        return CheckpointMeta(pos.step, pos.epoch, self.workload, self.group.size,
                              self.architecture.checkpoint_tag, self.fingerprint)

    def maybe_save(self, pos: Position, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> None:
        """On every worker after each step: save checkpoint ``pos.step`` if one is due."""
        if self.every is None or pos.step % self.every:
            return
        state = None
        if self.manager.committer:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "position": [pos.step, pos.epoch, pos.consumed]}
        self.manager.save_rank_files(pos.step, state, per_rank={"rng": capture_rng_state()})
        self.architecture.commit_checkpoint(
            pos.step, lambda: self.manager.commit(pos.step, self._meta(pos)))

    def save_rank_state(self, step: int, rank_state: dict[str, Any]) -> None:
        """On a rank that does not train (a server): write its own state into ``step``."""
        self.manager.save_rank_files(step, per_rank={"rng": capture_rng_state(),
                                                     "state": rank_state})

    def load(self) -> Resumed | None:
        """On every rank: load the newest valid checkpoint and this rank's RNG streams.

        Returns:
            What to continue from, or None when there is no checkpoint.
        Raises:
            CheckpointError: the chosen checkpoint is of another run, or cannot be read.
        """
        expect = self._meta(Position())
        reshard = self.architecture.replicated
        chosen = torch.tensor([NONE], dtype=torch.int64)
        refusal = None
        if self.group.rank == 0:
            try:
                found = self.manager.load_latest_valid(expect, allow_reshard=reshard)
                chosen[0] = NONE if found is None else found[0]
            except CheckpointError as exc:
                chosen[0], refusal = REFUSED, exc
        comm.broadcast(chosen, src=0, group=self.group)  # every rank stops, or none does
        step = int(chosen.item())
        if step == REFUSED:
            raise refusal or CheckpointRefusedError("rank 0 found no checkpoint to resume "
                                                    "from (its error says why)")
        if step == NONE:
            log.info("no checkpoint to resume from; starting afresh")
            return None
        state, per_rank, meta = self.manager.load(step, expect=expect, allow_reshard=reshard)
        pos = Position(*state["position"])
        if meta.world_size == self.group.size and per_rank is not None:
            restore_rng_state(per_rank["rng"])
        else:
            # Same share of the epoch, counted on the new number of ranks.
            pos.consumed = pos.consumed * meta.world_size // self.group.size
        log.info("resumed from step %d (epoch %d)", pos.step, pos.epoch)
        return Resumed(pos, state, None if per_rank is None else per_rank.get("state"))
