"""Where the ranks' output goes: the console, per-rank files, or both (torchrun's --log-dir,
--redirects and --tee).

    logs = RankLogs("logs", [0, 1])     # files, and the console prefixed [rank N]
    run_processes(cmds, envs, on_line=logs.on_line)
    logs.close()

Each rank writes ``DIR/rank-N/stdout.log`` and ``stderr.log`` (N the global rank), all
created before any rank starts. A restart of the group appends to them after a line that
says so. Files are opened without following a symlink (O_NOFOLLOW): a link planted in the
directory is refused, not written through. No torch import.
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
        ranks: the global ranks whose output this launcher sees, in the supervisor's order
            (its index ``i`` is rank ``ranks[i]``: node 1 of two with 2 each sees 2, 3).
        redirects: streams that go to the files only (torchrun's code: 1, 2 or 3).
        tee: streams shown on the console too, prefixed ``[rank N]``.

    Raises:
        ValueError: a file cannot be created (one line naming it), before any rank starts.
    """

    def __init__(self, directory: str, ranks: list[int], redirects: int = 0, tee: int = 3):
        self.directory = Path(directory)
        self.ranks = ranks
        self.console = tee & ~redirects
        self._files: dict[tuple[int, str], IO[str]] = {}
        self._lock = threading.Lock()  # one reader thread per rank and stream calls on_line
        self._open(restart=0)

    def _open(self, restart: int) -> None:
        for rank in self.ranks:
            folder = self.directory / f"rank-{rank}"
            for stream in ("stdout", "stderr"):
                path = folder / f"{stream}.log"
                mode = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                mode |= os.O_APPEND if restart else os.O_TRUNC
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    fd = os.open(path, mode, 0o644)
                except OSError as exc:  # a symlink in its place: ELOOP
                    raise ValueError(f"cannot write the log {path}: "
                                     f"{exc.strerror or exc}") from None
                f = self._files[(rank, stream)] = os.fdopen(fd, "w", buffering=1,
                                                             errors="replace")
                if restart:
                    f.write(f"[gradsync run: restart {restart}]\n")

    def on_line(self, index: int, stream: str, line: str) -> None:
        """The supervisor's callback (gradsync.launcher.OnLine)."""
        rank = self.ranks[index]
        with self._lock:
            self._files[(rank, stream)].write(line + "\n")
            if self.console & _bit(stream):
                out = sys.stdout if stream == "stdout" else sys.stderr
                out.write(f"[rank {rank}] {line}\n")
                out.flush()

    def restarted(self, count: int) -> None:
        """The group starts again: later lines are appended, after a marker."""
        self.close()
        with self._lock:
            self._open(restart=count)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
