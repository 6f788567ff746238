"""Taking a checkpoint directory for one run (:func:`take_directory`), and the fresh-run
guard: a run that does not resume refuses a directory holding committed checkpoints, unless
told to overwrite them (then it names whose they were and removes them)."""

from __future__ import annotations

import logging

from .format import CheckpointError, CheckpointMeta, describe_os_error
from .lock import DirectoryLock, DirectoryLockedError
from .manager import CheckpointManager

log = logging.getLogger(__name__)


def take_directory(manager: CheckpointManager) -> tuple[DirectoryLock, bool]:
    """Create the directory if it is missing, lock it for this run (held until released or
    the process exits) and remove a crashed run's staging directories (every save stages
    afresh). Returns the lock and whether the directory was created.

    Raises:
        CheckpointError: another user's directory, another job holds the lock, or the file
            system refused (one line).
    """
    created = manager.create()  # refuses another user's directory
    try:
        lock = DirectoryLock(manager.directory)
        manager.remove_staging()
    except DirectoryLockedError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:  # a read-only directory: one line, not a traceback
        raise CheckpointError(describe_os_error(exc, manager.directory)) from None
    return lock, created


def fresh_start(manager: CheckpointManager, overwrite: bool, expect: CheckpointMeta) -> None:
    """On rank 0, holding the directory's lock, before a run that starts at step 0.

    Raises:
        CheckpointError: committed checkpoints are there and not ``overwrite``, or removing
            them failed (one line).
    """
    directory = manager.directory
    committed = manager.committed()
    if committed and not overwrite:
        raise CheckpointError(
            f"{directory} already holds committed checkpoints (steps "
            f"{_steps([s for s, _ in committed])}); pass --resume to continue from "
            "the newest, or --overwrite to replace them")
    if committed:
        # Said before anything goes: they may be another workload's.
        log.warning("--overwrite: removing from %s the checkpoints of %s", directory,
                    _owners(committed, expect))
        try:
            manager.clear()
        except OSError as exc:
            raise CheckpointError(describe_os_error(exc, directory)) from None


def _owners(committed: list[tuple[int, CheckpointMeta]], expect: CheckpointMeta) -> str:
    """``"workload digits-mlp (allreduce, another workload) steps 2, 4; ..."``, per run."""
    runs: dict[tuple[str, str], list[int]] = {}
    for step, meta in committed:
        runs.setdefault((meta.workload, meta.arch), []).append(step)
    return "; ".join(
        f"workload {workload} ({arch}"
        f"{', another workload' if workload != expect.workload else ''}) steps {_steps(steps)}"
        for (workload, arch), steps in runs.items())


def _steps(steps: list[int]) -> str:
    shown = ", ".join(map(str, steps[-5:]))
    return shown if len(steps) <= 5 else f"..., {shown}"
