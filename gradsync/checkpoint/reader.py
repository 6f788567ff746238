"""Finding and reading checkpoints: which steps are committed, and loading one verified.

Only a directory whose ``COMMITTED`` marker parses and whose files have the recorded sizes
counts as committed (cheap: nothing is hashed); loading checks every file it reads against
its sha256, and ``load_latest_valid`` every file of the candidate, so a step chosen on one
rank can be loaded by all.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .format import (MARKER, STATE_FILE, STEP_DIR_RE, CheckpointError, CheckpointMeta,
                     IncompatibleCheckpointError, check_compatible, read_file, read_marker,
                     step_dirname, verify_file)

__all__ = ["CheckpointReader"]

log = logging.getLogger(__name__)


class CheckpointReader:
    """Read the checkpoints in ``directory`` as rank ``rank`` (whose per-rank file it loads)."""

    def __init__(self, directory: str | Path, rank: int = 0):
        self.directory = Path(directory)
        self.rank = rank

    # -- finding ---------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Return the steps with a valid marker and files of the recorded sizes, ascending.

        Cheap: reads the markers and stats the files, hashes nothing.
        """
        return [step for step, _ in self.committed()]

    def committed(self) -> list[tuple[int, CheckpointMeta]]:
        """`(step, meta)` of every committed step, ascending; see `committed_steps`."""
        found = []
        for step, path in self._entries():
            try:
                meta, _ = read_marker(path, step, check_sizes=True)
            except CheckpointError as exc:
                log.debug("not a committed checkpoint: %s", exc)
                continue
            found.append((step, meta))
        return found

    def latest(self) -> int | None:
        """Return the newest committed step, or None; see `committed_steps`."""
        steps = self.committed_steps()
        return steps[-1] if steps else None

    # -- reading ---------------------------------------------------------------------------

    def load(self, step: int, *, expect: CheckpointMeta | None = None,
             allow_reshard: bool = False) -> tuple[dict, dict | None, CheckpointMeta]:
        """Load checkpoint `step`, verifying the checksum of every file read.

        Args:
            step: the step to load.
            expect: this run's meta (its step and epoch are ignored), or None to skip the
                compatibility check.
            allow_reshard: accept a different `world_size`; the replicated state loads,
                the per-rank states (which belong to other ranks' streams) do not.

        Returns:
            `(state, per_rank, meta)`; `per_rank` is this rank's dict, or None when the
            checkpoint has none for this rank or the world size changed.

        Raises:
            IncompatibleCheckpointError: if the meta does not match `expect`.
            CheckpointError: if the directory or marker is missing or unreadable, or a
                file is missing, truncated, fails its checksum or cannot be unpickled.
        """
        return self._load(step, expect, allow_reshard, verify_all=False)

    def load_latest_valid(self, expect: CheckpointMeta | None = None, *,
                          allow_reshard: bool = False, below: int | None = None
                          ) -> tuple[int, dict, dict | None, CheckpointMeta] | None:
        """Load the newest checkpoint that passes every check, skipping damaged ones.

        Every file of a candidate is verified, other ranks' included, so the step chosen
        here (on one rank, then broadcast) is one every rank can load. A damaged checkpoint
        is skipped with a warning naming it; an incompatible one raises, because falling
        back would silently resume some other run.

        Args:
            expect, allow_reshard: as for `load`.
            below: only consider steps before this one (a fall-back after a rank failed).

        Returns:
            `(step, state, per_rank, meta)`, or None when no checkpoint is usable.

        Raises:
            IncompatibleCheckpointError: if the newest intact checkpoint does not match.
        """
        for step, path in reversed(self._entries()):
            if below is not None and step >= below:
                continue
            if path.is_dir() and not (path / MARKER).exists():
                log.info("ignoring %s: its save never committed", path)
                continue
            try:
                return (step, *self._load(step, expect, allow_reshard, verify_all=True))
            except IncompatibleCheckpointError:
                raise
            except CheckpointError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
        return None

    def _load(self, step: int, expect: CheckpointMeta | None, allow_reshard: bool,
              verify_all: bool) -> tuple[dict, dict | None, CheckpointMeta]:
        path = self.directory / step_dirname(step)
        meta, files = read_marker(path, step, check_sizes=False)
        if expect is not None:
            check_compatible(meta, expect, path, allow_reshard)
        resharded = expect is not None and expect.world_size != meta.world_size
        mine = f"rank-{self.rank}.pt" if not resharded else None
        if verify_all and not resharded:  # a resharded resume reads no rank file
            for name in sorted(set(files) - {STATE_FILE, mine}):
                verify_file(path / name, files[name])
        state = read_file(path / STATE_FILE, files[STATE_FILE])
        per_rank = read_file(path / mine, files[mine]) if mine in files else None
        return state, per_rank, meta

    def marked_steps(self) -> list[int]:
        """Steps whose directory holds a marker, ascending, whether or not it still verifies
        (to say why none loads)."""
        return [step for step, path in self._entries() if (path / MARKER).exists()]

    def has_entries(self) -> bool:
        """Whether anything named like a checkpoint is here (committed or not)."""
        return bool(self._entries())

    def _entries(self) -> list[tuple[int, Path]]:
        """`(step, path)` of every name like a checkpoint (not staging), ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = STEP_DIR_RE.match(entry.name)
            if match is not None and not match.group(2):
                found.append((int(match.group(1)), entry))
        return sorted(found)
