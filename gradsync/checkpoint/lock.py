"""An advisory lock on a checkpoint directory: two jobs never write one directory at once.

The lock is ``flock`` on ``DIR/LOCK``, held by one process of a job (rank 0) for as long as
it lives: the kernel releases it when the process exits, however it exits, so a crashed job
never leaves a stale lock behind. The file holds the holder's pid and host for the message
another job gets; its content is informative only, the lock itself is the ``flock``. It is
never opened through a symlink, and must be a plain file with one name: otherwise taking the
lock would truncate and overwrite whatever the link points to.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from .format import CheckpointError

LOCK_FILE = "LOCK"


class DirectoryLockedError(Exception):
    """Another process holds the directory's lock; the message names it."""


class DirectoryLock:
    """Hold ``flock(DIR/LOCK)`` until :meth:`release` or process exit.

    Args:
        directory: the directory to lock; it must exist.

    Raises:
        DirectoryLockedError: another process (of this or another job) holds the lock.
        CheckpointError: ``DIR/LOCK`` is a symlink, not a plain file, or has other names.
        OSError: the lock file cannot be created (a read-only directory).
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{self.path} is a symbolic link; the lock file is "
                                      "never opened through one (taking the lock would "
                                      "overwrite its target): remove it") from None
            raise
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise CheckpointError(f"{self.path} is not a plain file with one name (a "
                                      "hard link or a special file); taking the lock would "
                                      "overwrite it: remove it")
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
