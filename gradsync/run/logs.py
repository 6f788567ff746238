"""Where the ranks' output goes: the console, per-rank files, or both (torchrun's --log-dir,
--redirects and --tee).

    logs = RankLogs("logs", redirects=0, tee=3)   # files, and the console prefixed [rank N]
    run_processes(cmds, envs, on_line=logs.on_line)
    logs.close()

Each rank writes ``DIR/rank-N/stdout.log`` and ``stderr.log``. A restart of the group
appends to them after a line that says so. Files are created without following a symlink
(O_NOFOLLOW), so a link planted in the directory is not written through. No torch import.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import IO

STDOUT, STDERR = 1, 2  # torchrun's stream bits: 1 stdout, 2 stderr, 3 both


def _bit(stream: str) -> int:
    return STDOUT if stream == "stdout" else STDERR


class RankLogs:
    """Route each line of each rank to its file and (unless redirected) to the console.

    Args:
        directory: where the per-rank directories go (created if missing).
        redirects: streams that go to the files only (torchrun's code: 1, 2 or 3).
        tee: streams shown on the console too, prefixed ``[rank N]``.
    """

    def __init__(self, directory: str, redirects: int = 0, tee: int = 3):
        self.directory = Path(directory)
        self.console = tee & ~redirects
        self._files: dict[tuple[int, str], IO[str]] = {}
        self._lock = threading.Lock()  # one reader thread per rank and stream calls on_line
        self._restart = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create --log-dir {directory}: "
                             f"{exc.strerror or exc}") from None

    def _file(self, rank: int, stream: str) -> IO[str]:
        key = (rank, stream)
        if key not in self._files:
            folder = self.directory / f"rank-{rank}"
            folder.mkdir(exist_ok=True)
            mode = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            mode |= os.O_APPEND if self._restart else os.O_TRUNC
            fd = os.open(folder / f"{stream}.log", mode, 0o644)
            self._files[key] = os.fdopen(fd, "w", buffering=1, errors="replace")
            if self._restart:
                self._files[key].write(f"[gradsync run: restart {self._restart}]\n")
        return self._files[key]

    def on_line(self, rank: int, stream: str, line: str) -> None:
        """The supervisor's callback (gradsync.launcher.OnLine)."""
        with self._lock:
            self._file(rank, stream).write(line + "\n")
            if self.console & _bit(stream):
                out = sys.stdout if stream == "stdout" else sys.stderr
                out.write(f"[rank {rank}] {line}\n")
                out.flush()

    def restarted(self, count: int) -> None:
        """The group starts again: later lines are appended, after a marker."""
        self.close()
        self._restart = count

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
