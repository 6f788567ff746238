"""An advisory lock on a checkpoint directory: two jobs never write one directory at once.

The lock is ``flock`` on ``DIR/LOCK``, held by one process of a job (rank 0) for as long as
it lives: the kernel releases it when the process exits, however it exits, so a crashed job
never leaves a stale lock behind. The file holds the holder's pid and host for the message
another job gets; its content is informative only, the lock itself is the ``flock``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "LOCK"


class DirectoryLockedError(Exception):
    """Another process holds the directory's lock; the message names it."""


class DirectoryLock:
    """Hold ``flock(DIR/LOCK)`` until :meth:`release` or process exit.

    Args:
        directory: the directory to lock; it must exist.

    Raises:
        DirectoryLockedError: another process (of this or another job) holds the lock.
        OSError: the lock file cannot be created.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryLockedError(
                f"checkpoint directory {self.path.parent} is in use by another run"
                f"{f' ({holder})' if holder else ''}; two runs cannot write one directory "
                "at once: wait for it to finish or choose another --checkpoint-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
