"""Checkpoints of `gradsync train --elastic`: the current members keep writing them, and a
run that lost every worker resumes from the newest one (``--resume``).

    gradsync train --elastic --workers 4 --min-workers 2 --checkpoint-dir ck --checkpoint-every 50
    gradsync train --elastic --workers 4 --checkpoint-dir ck --resume     # after a stop

Every member holds the same model, optimizer state and position (elastic_state.py agrees on
them at each change of membership), so rank 0 of the current generation writes the whole
checkpoint alone through CheckpointManager's atomic save; no collective is involved, so a
save never waits for a member that may be lost. A member lost mid-save leaves a staging
directory that the next save of that step replaces; the newest committed checkpoint stays
readable. The position is the elastic one (step, epoch, samples of the epoch's global order
consumed), which does not depend on the member count: the checkpoint resumes with any number
of workers. Its tag (:data:`TAG`) keeps it apart from a non-elastic run's, whose data order
differs (a sharded sampler per rank).

The directory's lock and the fresh-run guard are the launcher's (:func:`claim`): it
outlives every worker, where the rank 0 that took the lock may be the first one lost.
"""

from __future__ import annotations

import logging

from torch import nn

from ..checkpoint import CheckpointManager, CheckpointMeta, DirectoryLock, model_fingerprint
from ..checkpoint.guard import fresh_start, take_directory
from ..checkpoint.run import plain_settings
from .config import CheckpointConfig
from .elastic_sync import Position

log = logging.getLogger(__name__)

TAG = "allreduce (elastic)"


def claim(config: CheckpointConfig, workload: str) -> DirectoryLock:
    """The launcher, before starting the workers: create and lock the directory for the
    whole run, and refuse (or with ``--overwrite`` clear) a fresh run's directory that holds
    committed checkpoints.

    Raises:
        CheckpointError: the directory is locked, another user's, read-only, or holds
            checkpoints a fresh run would overwrite (one line).
    """
    manager = CheckpointManager(config.dir, keep=config.keep)
    lock, created = take_directory(manager)
    try:
        if not config.resume:
            fresh_start(manager, config.overwrite, CheckpointMeta(0, 0, workload, 1, TAG, ""))
        elif created or not manager.committed():
            log.warning("--resume: nothing to resume in %s; starting from step 0", config.dir)
    except BaseException:
        lock.release()
        raise
    return lock


class ElasticCheckpoints:
    """A worker's side: :meth:`resume` before the first generation, :meth:`maybe_save`
    after each step (it writes on the generation's rank 0 only)."""

    def __init__(self, config: CheckpointConfig, model: nn.Module, workload: str,
                 settings: dict | None = None) -> None:
        self.every = config.every
        self.manager = CheckpointManager(config.dir, keep=config.keep)
        self.model, self.workload = model, workload
        self.settings = plain_settings(settings)
        self.fingerprint = model_fingerprint(model)

    def meta(self, position: Position, members: int) -> CheckpointMeta:
        return CheckpointMeta(position.step, position.epoch, self.workload, members, TAG,
                              self.fingerprint, settings=self.settings)

    def resume(self, optimizer) -> Position | None:
        """Load the newest checkpoint that verifies into the model and ``optimizer``;
        its position, or None when there is none. Every first-generation worker reads it;
        agreeing on the state at the first generation then covers a worker that could not.

        Raises:
            IncompatibleCheckpointError: the newest intact checkpoint is another run's.
        """
        found = self.manager.load_latest_valid(self.meta(Position(), 1), allow_reshard=True)
        if found is None:
            return None
        step, state, _, meta = found
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        position = Position(*state["position"])
        log.info("resumed from step %d (epoch %d), written by %d workers", step,
                 position.epoch, meta.world_size)
        return position

    def maybe_save(self, position: Position, optimizer, rank: int, members: int) -> bool:
        """After step ``position.step``: write it if due and this is the generation's rank 0."""
        if self.every is None or position.step % self.every or rank != 0:
            return False
        state = {"model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "position": [position.step, position.epoch, position.offset]}
        self.manager.save(position.step, state, self.meta(position, members))
        return True
