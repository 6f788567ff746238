"""Atomic, verified checkpoints: a crash at any moment leaves the last committed one loadable.

Layout of a checkpoint directory::

    step-00000120/          a committed checkpoint
        state.pt            the committer: the replicated state (model, optimizer, sampler, ...)
        rank-0.pt ...       each rank's own state (RNG streams), when the caller passes any
        COMMITTED           JSON, written last: format, meta, sha256 and size of every file
    step-00000140.tmp/      a save in progress, or one a crash interrupted

A save writes every file into `step-N.tmp/` (flush + fsync each file, fsync the directory),
the committer (rank 0 unless told otherwise) renames it to `step-N/` (fsync the parent), then
writes `COMMITTED` through a
temporary name (fsync, rename, fsync). Only a directory whose marker parses and whose files
have the recorded sizes counts; `load` also checks every file it reads against its sha256.
The staging name carries no pid because all ranks of one save write into it; one job per
directory, and one save in flight at a time.

Nothing is written through a symlink: the directory must belong to this user and be writable
by no one else, a run removes the staging directories left by earlier ones before it saves,
a staging directory is made with ``mkdir`` (a symlink in its place is removed first), and
every file is created anew with ``O_EXCL | O_NOFOLLOW``.

With several ranks the caller separates the two halves by a barrier (or another proof that
every rank's file is on disk, such as the Parameter Server's acknowledgements), so the
committer never commits before every rank's file is there::

    mgr.save_rank_files(step, state if rank == 0 else None, per_rank=capture_rng_state())
    barrier()
    if rank == 0:
        mgr.commit(step, meta)

Nothing here communicates; choosing one step for all ranks is the caller's broadcast.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from .directory import check_private, make_staging
from .format import (MARKER, STATE_FILE, STEP_DIR_RE, CheckpointError, CheckpointMeta,
                     CheckpointRefusedError, check_loadable, describe_os_error, fsync_dir,
                     remove_path, same_run, sha256_of, step_dirname, write_fsynced,
                     write_marker)
from .reader import CheckpointReader

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)


class CheckpointManager(CheckpointReader):
    """Write, find, verify and load the checkpoints of one run in one directory.

    Args:
        directory: where the `step-*` directories live. Every rank
            must see the same directory (a local disk for one node, a shared one otherwise).
        keep: committed checkpoints to keep; older ones are removed after each commit.
            The directory is created by `create` or by the first save, not here.
        rank: this process's rank; names its per-rank file.
        committer: whether this rank writes the replicated state and commits (default:
            rank 0 does).

    Raises:
        ValueError: if `keep < 1` or `rank < 0`.
    """

    def __init__(self, directory: str | Path, keep: int = 3, rank: int = 0,
                 committer: bool | None = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        super().__init__(directory, rank)
        self.keep = keep
        self.committer = rank == 0 if committer is None else committer
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} is a file, "
                                  "not a directory")
        # (step, {file: {"sha256", "bytes"}} of the committer's own files, per-rank files written?)
        self._pending: tuple[int, dict[str, dict[str, Any]], bool] | None = None
        self._checked = False  # check_private passed for this directory

    # -- writing ---------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], meta: CheckpointMeta, *,
             per_rank: dict[str, Any] | None = None) -> Path:
        """Write and commit a checkpoint from a single process (`save_rank_files` + `commit`).

        Args:
            step: the step being saved; must equal `meta.step`.
            state: the replicated state; tensors, dicts, lists, tuples, str, int, float,
                bool and None only.
            meta: identification written into the marker.
            per_rank: this rank's own state (e.g. `capture_rng_state()`), or None.

        Returns:
            The committed `step-N` directory.

        Raises:
            TypeError: if the state holds an object weights-only loading cannot rebuild.
            ValueError: if called on another rank than the committer, or `step != meta.step`.
            CheckpointError: the directory belongs to another user or others may write
                into it, or the file system refused (one line).
        """
        if self.committer:
            self.create()
            self.discard(step)  # one process: a leftover staging directory is no peer's
        self.save_rank_files(step, state, per_rank=per_rank)
        return self.commit(step, meta)

    def save_rank_files(self, step: int, state: dict[str, Any] | None = None, *,
                        per_rank: dict[str, Any] | None = None) -> None:
        """Write this rank's files of checkpoint `step` into its staging directory.

        Args:
            step: the step being saved.
            state: the replicated state on the committer; ignored on other ranks.
            per_rank: this rank's own state, or None; all ranks pass one or none do.

        Raises:
            TypeError: if a state holds an object weights-only loading cannot rebuild.
            ValueError: if the committer passes no `state`.
            CheckpointError: the directory belongs to another user or others may write
                into it, or the file system refused (one line).
        """
        staging = self.directory / f"{step_dirname(step)}.tmp"
        written: dict[str, dict[str, Any]] = {}
        if self.committer:
            if state is None:
                raise ValueError("the committer must pass the state to save_rank_files")
            check_loadable(state, "state")
        if per_rank is not None:
            check_loadable(per_rank, "per_rank")
        self.create()
        try:
            make_staging(staging)  # every rank may; the first one makes it
            if self.committer:
                written[STATE_FILE] = write_fsynced(staging / STATE_FILE, state)
            if per_rank is not None:
                written[f"rank-{self.rank}.pt"] = write_fsynced(
                    staging / f"rank-{self.rank}.pt", per_rank)
            fsync_dir(staging)  # the new directory entries, not only the file contents
        except FileNotFoundError:
            # Only a failed save removes a staging directory under our feet: the rank that
            # failed says why, in one line.
            raise CheckpointRefusedError(f"checkpoint step {step} was abandoned by another "
                                         "rank (its error says why)") from None
        except OSError as exc:
            raise self._write_failed(exc, staging) from None
        if self.committer:
            self._pending = (step, written, per_rank is not None)

    def discard(self, step: int) -> None:
        """Remove the staging directory of an abandoned save of ``step``, if it is there."""
        try:
            remove_path(self.directory / f"{step_dirname(step)}.tmp")
        except FileNotFoundError:  # another rank of the same save removed it first
            pass

    def _write_failed(self, exc: OSError, *partial: Path) -> CheckpointError:
        """Remove a failed save's partial directories; the error says the newest is intact."""
        for path in partial:
            try:
                if path.exists():
                    remove_path(path)
            except OSError:  # another rank of the same save may be removing it too
                pass
        latest = self.latest()
        kept = (f"the newest committed checkpoint (step {latest}) is intact" if latest is not None
                else "no committed checkpoint existed")
        return CheckpointError(f"{describe_os_error(exc, self.directory)}; the partial save "
                               f"was removed and {kept}")

    def commit(self, step: int, meta: CheckpointMeta) -> Path:
        """On the committer, after every rank's `save_rank_files(step)`: make `step` count.

        Then removes what is no longer needed: committed checkpoints beyond `keep`, any
        newer than `step` (left by a run that resumed from an older one, so a later resume
        cannot jump back onto the abandoned run), uncommitted `step-*` directories and
        staging directories of steps up to `step`. Directories with an unreadable marker
        are left for inspection.

        Args:
            step: the step saved; must equal `meta.step`.
            meta: identification written into the marker; `meta.world_size` ranks'
                per-rank files are expected when the committer wrote one.

        Returns:
            The committed `step-N` directory.

        Raises:
            ValueError: on another rank than the committer, without a matching
                `save_rank_files`, or when `step != meta.step`.
            CheckpointError: if a rank's file is missing from the staging directory.
        """
        if not self.committer:
            raise ValueError(f"rank {self.rank} is not the committer of checkpoints")
        if meta.step != step:
            raise ValueError(f"meta.step is {meta.step} but the checkpoint is step {step}")
        if self._pending is None or self._pending[0] != step:
            raise ValueError(f"commit({step}) without save_rank_files({step}) on the committer")
        _, files, with_rank_files = self._pending
        staging = self.directory / f"{step_dirname(step)}.tmp"
        expected = {STATE_FILE}
        if with_rank_files:
            expected |= {f"rank-{r}.pt" for r in range(meta.world_size)}
        for entry in staging.iterdir():
            if entry.name not in expected:  # left by an interrupted earlier attempt
                remove_path(entry)
        for name in sorted(expected - set(files)):  # the other ranks' files
            path = staging / name
            try:
                found = os.lstat(path)
            except FileNotFoundError:
                found = None
            if found is None or not stat.S_ISREG(found.st_mode):  # a symlink is not theirs
                raise CheckpointError(f"{path}: missing; every rank must finish "
                                      "save_rank_files before the committer commits")
            files[name] = {"sha256": sha256_of(path), "bytes": found.st_size}
        final = self.directory / step_dirname(step)
        try:
            if final.exists() or final.is_symlink():  # an earlier attempt at the same step
                remove_path(final)
            os.rename(staging, final)
            fsync_dir(self.directory)
            write_marker(final, meta, files)
        except OSError as exc:
            self._pending = None
            raise self._write_failed(exc, staging, final) from None
        self._pending = None
        log.info("committed checkpoint %s (%.1f MB)", final,
                 sum(e["bytes"] for e in files.values()) / 2**20)
        self._prune(meta)
        return final

    def _prune(self, meta: CheckpointMeta) -> None:
        """Only ever removes checkpoints of this run (same workload, model, architecture)."""
        ours = {s for s, m in self.committed() if same_run(m, meta)}
        kept = sorted(s for s in ours if s <= meta.step)[-self.keep:]
        for entry in sorted(self.directory.iterdir()):
            match = STEP_DIR_RE.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            s = int(match.group(1))
            if match.group(2):  # staging; later steps may be in flight on other ranks
                if s <= meta.step:
                    remove_path(entry)
            elif not (entry / MARKER).exists():
                remove_path(entry)  # a crash between the rename and the marker
            elif s in ours and s not in kept:
                if s > meta.step:
                    log.warning("removing %s: newer than the checkpoint just committed, "
                                "left by a run that resumed from an older step", entry)
                remove_path(entry)

    def clear(self) -> None:
        """Remove every checkpoint and staging directory (``--overwrite``)."""
        for entry in sorted(self.directory.iterdir()):
            if STEP_DIR_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                remove_path(entry)
        fsync_dir(self.directory)

    def remove_staging(self) -> None:
        """Remove every staging directory (those of a run that crashed while saving), so
        that each save of this run makes its own: call it holding the lock, before saving."""
        for entry in sorted(self.directory.iterdir()):
            match = STEP_DIR_RE.match(entry.name)
            if match is not None and match.group(2):
                remove_path(entry)  # a symlink: the link goes, not its target

    def create(self) -> bool:
        """Create the directory if missing (saving does too); return whether it was.

        Raises:
            CheckpointError: it cannot be created, belongs to another user, or its group or
                others may write into it (`check_private`).
        """
        existed = self.directory.is_dir()
        try:
            # 0o755 whatever the umask allows more of: check_private refuses group write.
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint directory {self.directory}: "
                                  f"{exc.strerror or exc}") from None
        if not self._checked:
            check_private(self.directory)
            self._checked = True
        return not existed
