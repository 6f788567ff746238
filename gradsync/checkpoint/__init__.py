"""Checkpoints: atomic, verified, resumable exactly; nothing a user saved is lost.

    format.py    the on-disk format: meta, fsynced writes, checksums, the COMMITTED marker
    reader.py    which steps are committed; loading one, verified
    manager.py   writing: staging, the atomic commit, pruning (only the same run's)
    directory.py whose the directory is (this user's only), staging without symlinks
    lock.py      one job per directory (an advisory flock)
    rng.py       every random stream a rank draws from, saved and restored
    guard.py     the fresh-run guard (committed checkpoints refused unless overwritten)
    run.py       the one entry point of scripts and the trainer: :class:`Checkpointer` (when
                 to save, what a run saves and restores, agreeing on the step to resume
                 from); what a replicated run commits with is in protocol.py
"""

from .format import (CheckpointError, CheckpointMeta, CheckpointRefusedError,
                     IncompatibleCheckpointError, model_fingerprint)
from .lock import DirectoryLock, DirectoryLockedError
from .manager import CheckpointManager
from .reader import CheckpointReader
from .rng import capture_rng_state, restore_rng_state
from .protocol import Replicated
from .run import Checkpointer, Position, Resumed

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointMeta", "CheckpointReader",
           "CheckpointRefusedError", "Checkpointer", "DirectoryLock", "DirectoryLockedError",
           "IncompatibleCheckpointError", "Position", "Replicated", "Resumed",
           "capture_rng_state", "model_fingerprint", "restore_rng_state"]
