"""What checkpoints ask of the architecture that runs a training job.

A small Protocol of its own, so that checkpoint/ need not import the trainer's interface
(train/architecture.py), which imports the architectures, which import checkpoint/: the
layout test forbids that circle. Every trainer architecture satisfies it; so do
:class:`Replicated` (a script's All-Reduce) and a ``gradsync.ps.init`` context.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .. import comm
from .format import CheckpointRefusedError


class CheckpointParticipant(Protocol):
    group: comm.Group      # every rank of the run; each writes its own files
    committer: int         # the rank that writes the replicated state and commits
    checkpoint_tag: str    # what a checkpoint must have been written by to resume
    replicated: bool       # every worker holds all state: resumable on another count

    def commit_checkpoint(self, step: int, commit: Callable[[], None], written: bool = True
                          ) -> None:
        """Once every rank's files of checkpoint ``step`` are on disk, call ``commit`` on
        the committer (see train/architecture.py, ``Architecture.commit_checkpoint``)."""


class Replicated:
    """The participant of a replicated run over ``group`` (a script with
    ``gradsync.DataParallel`` or DDP, where every rank holds the whole state): rank 0
    writes the state and commits once every rank's files are on disk. Its checkpoints are
    those of ``gradsync train``'s All-Reduce, and resume on another number of ranks."""

    committer = 0
    checkpoint_tag = "allreduce"
    replicated = True

    def __init__(self, group: comm.Group):
        self.group = group

    def commit_checkpoint(self, step: int, commit: Callable[[], None], written: bool = True
                          ) -> None:
        commit_agreed(self.group, step, commit, written)


def commit_agreed(group: comm.Group, step: int, commit: Callable[[], None],
                  written: bool = True) -> None:
    """Collective on ``group``: every rank's files of ``step`` are on disk before rank 0
    commits, and the commit is done before anyone goes on. A rank whose write failed (a full
    disk) says so in these two exchanges instead of leaving, so that all stop together and
    it alone tells why (the caller raises its error).

    Raises:
        CheckpointRefusedError: on a rank that is fine when another is not.
    """
    _agree(group, written, f"could not write checkpoint step {step}")
    if not written:
        return
    error = None
    if group.rank == 0:
        try:
            commit()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
            error = exc
    _agree(group, error is None, f"could not commit checkpoint step {step}")
    if error is not None:
        raise error


def _agree(group: comm.Group, ok: bool, what: str) -> None:
    failed = comm.dist_sum(0 if ok else 1, group)
    if failed and ok:
        raise CheckpointRefusedError(f"{failed} rank(s) {what} (their error says why)")
