"""What checkpoints ask of the architecture that runs a training job.

A small Protocol of its own, so that checkpoint/ need not import the trainer's interface
(train/architecture.py), which imports the architectures, which import checkpoint/: the
layout test forbids that circle. Every trainer architecture satisfies it.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .. import comm


class CheckpointParticipant(Protocol):
    group: comm.Group      # every rank of the run; each writes its own files
    committer: int         # the rank that writes the replicated state and commits
    checkpoint_tag: str    # what a checkpoint must have been written by to resume
    replicated: bool       # every worker holds all state: resumable on another count

    def commit_checkpoint(self, step: int, commit: Callable[[], None], written: bool = True
                          ) -> None:
        """Once every rank's files of checkpoint ``step`` are on disk, call ``commit`` on
        the committer (see train/architecture.py, ``Architecture.commit_checkpoint``)."""
