"""Checkpoints in the training loop: when to save, what goes in, and resuming exactly.

What a checkpoint holds: the model and optimizer state, the step, the epoch and how many of
this rank's samples of that epoch were consumed (written once, by the architecture's
committer), and every rank's RNG streams plus whatever state the rank holds alone (a
parameter server's shard and optimizer state). Saving is collective: every rank writes its
files, the architecture makes sure all are on disk (a barrier, or the servers' answers), then
the committer commits. Loading is agreed: rank 0 picks the newest checkpoint that verifies
and broadcasts its step, so no rank can resume from a different one; if any rank cannot read
its files, all fall back together. One job at a time: rank 0 holds the directory's lock, and
a fresh run refuses a directory with committed checkpoints unless told to overwrite them. A
checkpoint written with another number of workers resumes a replicated architecture
(All-Reduce) too, continuing at the same fraction of the epoch, but without the per-rank RNG
streams. (A DataLoader without a generator of its own draws a seed from torch's stream
each time an epoch's iteration starts, once more in a run resumed mid-epoch: with random
layers such as dropout, pass ``DataLoader(..., generator=torch.Generator())`` for an exact
resume.)

One class for a user's script and for `gradsync train`. A script hands its objects over once
and calls two methods::

    ckpt = Checkpointer("ckpt", model, opt, sampler=sampler, batch_size=32, every=50)
    start = ckpt.start(resume=True)   # agreed across ranks; model, optimizer, sampler and
    for step in range(start, steps):  # RNG restored; 0 on a fresh run
        ...
        ckpt.step(step + 1)           # saves when due

The trainer, which tracks the epoch and the samples consumed itself, uses the two halves
underneath: :meth:`Checkpointer.load` (agree on a checkpoint, read it) and
:meth:`Checkpointer.maybe_save`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .. import comm
from .format import (CheckpointError, CheckpointMeta, CheckpointRefusedError,
                     bare_model, model_fingerprint)
from .lock import DirectoryLock
from .manager import CheckpointManager
from .guard import fresh_start, take_directory
from .protocol import CheckpointParticipant, Replicated
from .rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

NONE, REFUSED = -1, -2  # what rank 0 broadcasts instead of a step


def plain_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """A workload's settings as the marker stores them (a dtype by its name)."""
    return None if settings is None else {
        k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
        for k, v in settings.items()}


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
    """Save and restore the training state of every rank of ``arch.group``.

    Args:
        directory: where checkpoints live (every rank must see the same directory).
        model: the bare model (a ``gradsync.DataParallel`` or DDP wrapper is unwrapped):
            checkpoints hold its ``state_dict()`` under "model", and its fingerprint, which
            a resume must match.
        optimizer: saved and restored with the model (None: the caller passes it to
            :meth:`maybe_save`). On a Parameter-Server worker its state lives on the
            servers: ``gradsync.ps``'s ``DistributedOptimizer(..., checkpoint=ckpt)`` puts
            itself here.
        sampler: a :class:`~gradsync.data.ShardedSampler` whose epoch and position
            :meth:`step` records and :meth:`start` restores; needs ``batch_size``.
        batch_size: samples this rank consumes per step (the DataLoader's batch size).
        every: save each this many steps (None: never).
        keep: committed checkpoints to keep.
        arch: who writes, who commits and how the ranks know each other's files are on
            disk: a trainer architecture, or a ``gradsync.ps.init(...)`` context; None: a
            replicated run (``gradsync.DataParallel`` or DDP) over the whole world.
        workload: the run's name, recorded in every checkpoint; a resume must match it.
        settings: what the workload was built with, recorded in every checkpoint's meta so
            that ``gradsync serve`` rebuilds the same model: ``{"workload", "hidden",
            "dtype", "seed"}``, values str, int, float or bool (a ``torch.dtype`` is
            written by name). None records nothing.

    Raises:
        ValueError: ``sampler`` without ``batch_size``, or ``every`` below 1.
        RuntimeError: ``arch`` is None and no process group was started.
    """

    def __init__(self, directory: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *, sampler=None,
                 batch_size: int | None = None, every: int | None = None, keep: int = 3,
                 arch: CheckpointParticipant | None = None, workload: str = "script",
                 settings: dict[str, Any] | None = None):
        if sampler is not None and not batch_size:
            raise ValueError("a Checkpointer given a sampler needs batch_size (the samples "
                             "a rank consumes per step) to record where the epoch stands")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        self.every = every
        self.architecture = arch if arch is not None else Replicated(comm.world())
        self.group = self.architecture.group
        self.manager = CheckpointManager(directory, keep=keep, rank=self.group.rank,
                                         committer=self.group.rank == self.architecture.committer)
        self.workload = workload
        self.model, self.optimizer = bare_model(model), optimizer
        self.sampler, self.batch_size = sampler, batch_size
        self.fingerprint = model_fingerprint(self.model)
        self.settings = plain_settings(settings)
        self.position = Position()  # where the script stands (start, step)
        self.resumed: Resumed | None = None  # what start() resumed from
        self._lock: DirectoryLock | None = None  # rank 0 holds it for the whole run
        self._created = False  # rank 0: the directory did not exist before this run

    # --- a script's two calls -----------------------------------------------------------------

    def start(self, resume: bool = False, overwrite: bool = False) -> int:
        """On every rank, before training: agree on a checkpoint (see :meth:`load`) and put
        its model, optimizer, sampler position and RNG streams back.

        Returns:
            The step to continue from: 0 on a fresh run.
        Raises:
            CheckpointError: as :meth:`load`.
        """
        self.resumed = self.load(resume, overwrite)
        if self.resumed is None:
            self.position = Position()
            return 0
        pos, state = self.resumed.position, self.resumed.state
        self.model.load_state_dict(state["model"])
        # {} on the Parameter Server: its workers hold no optimizer state (the servers do)
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.sampler is not None:
            self.sampler.set_epoch(pos.epoch)
            self.sampler.set_position(min(pos.consumed, self.sampler.num_samples))
        self.position = Position(pos.step, pos.epoch, pos.consumed)
        return pos.step

    @property
    def epoch(self) -> int:
        """The epoch in progress at the step :meth:`start` resumed (0 on a fresh run)."""
        return self.position.epoch

    def step(self, step: int) -> bool:
        """On every worker after optimizer step ``step`` (steps done, counted from 1): save
        checkpoint ``step`` if one is due. The sampler's epoch, and ``batch_size`` samples
        per call within it, say where the data stands.

        Returns:
            Whether a checkpoint was saved.
        """
        pos = self.position
        if self.sampler is not None:
            if self.sampler.epoch != pos.epoch:  # set_epoch() began another one
                pos.epoch, pos.consumed = self.sampler.epoch, 0
            pos.consumed = min(pos.consumed + self.batch_size, self.sampler.num_samples)
        pos.step = step
        return self.maybe_save(Position(step, pos.epoch, pos.consumed), self.model,
                               self.optimizer)

    def close(self) -> None:
        """Release the directory's lock (rank 0); the process's end releases it too."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the two halves underneath (the trainer calls them) -----------------------------------

    def _meta(self, pos: Position) -> CheckpointMeta:
        return CheckpointMeta(pos.step, pos.epoch, self.workload, self.group.size,
                              self.architecture.checkpoint_tag, self.fingerprint,
                              settings=self.settings)

    def maybe_save(self, pos: Position, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer | None) -> bool:
        """On every worker after each step: save checkpoint ``pos.step`` if one is due;
        returns whether it was."""
        if self.every is None or pos.step % self.every:
            return False
        state = None
        if self.manager.committer:
            state = {"model": bare_model(model).state_dict(),
                     "optimizer": {} if optimizer is None else optimizer.state_dict(),
                     "position": [pos.step, pos.epoch, pos.consumed]}
        error = None
        try:
            self.manager.save_rank_files(pos.step, state, per_rank={"rng": capture_rng_state()})
        except CheckpointError as exc:  # a full disk: the others must stop with this rank
            error = exc
        try:
            self.architecture.commit_checkpoint(
                pos.step, lambda: self.manager.commit(pos.step, self._meta(pos)),
                written=error is None)
        except CheckpointRefusedError:
            self.manager.discard(pos.step)  # this rank may have written after it was removed
            raise
        if error is not None:
            raise error
        return True

    def save_rank_state(self, step: int, rank_state: dict[str, Any]) -> None:
        """On a rank that does not train (a server): write its own state into ``step``."""
        self.manager.save_rank_files(step, per_rank={"rng": capture_rng_state(),
                                                     "state": rank_state})

    def load(self, resume: bool, overwrite: bool = False) -> Resumed | None:
        """On every rank, before training: take the directory and agree on where to start.

        Rank 0 locks the directory (one job at a time), then decides: a fresh run refuses a
        directory that holds committed checkpoints unless ``overwrite`` (which removes them);
        ``resume`` picks the newest checkpoint that verifies. Rank 0 broadcasts the step,
        every rank loads it, and if any rank cannot read its files all fall back together to
        the next older one.

        Returns:
            What to continue from, or None to start at step 0.
        Raises:
            CheckpointError: the directory is locked, read-only, another user's or writable
                by others, or holds another run's checkpoints, or a fresh run would
                overwrite checkpoints (one line, on rank 0; the other ranks raise
                CheckpointRefusedError).
        """
        expect = self._meta(Position())
        reshard = self.architecture.replicated
        below: int | None = None
        while True:
            chosen = torch.tensor([NONE], dtype=torch.int64)
            refusal, verified = None, None
            if self.group.rank == 0:
                try:
                    verified = self._choose(resume, overwrite, expect, below)
                    chosen[0] = NONE if verified is None else verified[0]
                except CheckpointError as exc:
                    chosen[0], refusal = REFUSED, exc
                except OSError as exc:  # the other ranks must not wait for a lost rank 0
                    chosen[0], refusal = REFUSED, CheckpointError(
                        f"checkpoint directory {self.manager.directory}: {exc}")
            comm.broadcast(chosen, src=0, group=self.group)  # every rank stops, or none does
            step = int(chosen.item())
            if step == REFUSED:
                raise refusal or CheckpointRefusedError("rank 0 refused the checkpoint "
                                                        "directory (its error says why)")
            if step == NONE:
                return None
            failed = 0
            try:
                # Rank 0 has read and verified it already; the others read it now.
                state, per_rank, meta = verified[1:] if verified else self.manager.load(
                    step, expect=expect, allow_reshard=reshard)
            except CheckpointError as exc:
                log.warning("rank %d cannot use checkpoint step %d: %s", self.group.rank,
                            step, exc)
                failed = 1
            if not comm.dist_sum(failed, self.group):
                break
            below = step  # all ranks fall back to an older checkpoint together
        pos = Position(*state["position"])
        if meta.world_size == self.group.size and per_rank is not None:
            restore_rng_state(per_rank["rng"])
        else:
            # Same share of the epoch, counted on the new number of ranks.
            pos.consumed = pos.consumed * meta.world_size // self.group.size
        log.info("resumed from step %d (epoch %d)", pos.step, pos.epoch)
        return Resumed(pos, state, None if per_rank is None else per_rank.get("state"))

    def _choose(self, resume: bool, overwrite: bool, expect: CheckpointMeta,
                below: int | None) -> tuple[int, dict, dict | None, CheckpointMeta] | None:
        """Rank 0: lock the directory and return the checkpoint to start from, as
        ``load_latest_valid`` read and verified it, or None to start afresh."""
        directory = self.manager.directory
        if self._lock is None:
            self._lock, self._created = take_directory(self.manager)
        if not resume:
            fresh_start(self.manager, overwrite, expect)  # the fresh-run guard
            return None
        found = self.manager.load_latest_valid(expect, allow_reshard=self.architecture.replicated,
                                               below=below)
        if found is not None:
            return found
        if self._created:
            why = "the directory did not exist"
        elif below is not None:
            why = f"no readable checkpoint older than step {below} (see the warnings above)"
        elif self.manager.has_entries():
            why = "every checkpoint in it is damaged or was never committed"
        else:
            why = "it holds no checkpoint"
        log.warning("--resume: nothing to resume in %s (%s); starting from step 0",
                    directory, why)
        return None

