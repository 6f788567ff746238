"""Whose the checkpoint directory is, and making a staging directory in it, never through a
symlink (issue 22): whoever can write into the directory could plant a symlink where a
checkpoint file will be written, so it must be this user's and nobody else's to write into.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .format import CheckpointError


def make_staging(path: Path) -> None:
    """Create the staging directory ``path``, or join the one a peer rank of the same save
    made; never one reached through a symlink.

    Leftovers of earlier runs are removed before a run saves (``remove_staging``), so a real
    directory found here was made by this save. A symlink or file in its place is unlinked
    once and the directory made anew.

    Raises:
        CheckpointError: it is another user's directory, or not a directory again after
            being removed.
        OSError: the file system refused (FileNotFoundError: a failed save removed it).
    """
    for attempt in range(2):
        try:
            os.mkdir(path, 0o755)
            return
        except FileExistsError:
            found = os.lstat(path)
        if stat.S_ISDIR(found.st_mode):
            if found.st_uid != os.geteuid():
                raise CheckpointError(f"{path}: owned by {_user(found.st_uid)}, not by this "
                                      "user; refusing to write a checkpoint into it")
            return
        if attempt == 0:
            os.unlink(path)  # a symlink: removes the link, not what it points to
    raise CheckpointError(f"{path}: reappeared as a non-directory after it was removed; "
                          "another process is writing into the checkpoint directory")


def check_private(directory: Path) -> None:
    """Refuse a checkpoint directory that another user could write into.

    Whoever can write into it can plant a symlink where a checkpoint file will be written
    or swap a committed checkpoint, so it must belong to this user (the effective uid) and
    be writable neither by its group nor by others (``mode & 0o022`` clear).

    Raises:
        CheckpointError: one line naming the directory, the owner or mode, and the fix.
    """
    found = os.stat(directory)
    if found.st_uid != os.geteuid():
        raise CheckpointError(
            f"checkpoint directory {directory} is owned by {_user(found.st_uid)}, not by this "
            f"user ({_user(os.geteuid())}); another user's directory could hold files planted "
            "to be overwritten: choose a --checkpoint-dir of your own")
    if found.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002))
                           if found.st_mode & bit)
        raise CheckpointError(
            f"checkpoint directory {directory} is writable by {who} (mode "
            f"{stat.S_IMODE(found.st_mode):o}), who could plant files in it to be "
            f"overwritten: chmod go-w {directory}, or choose another --checkpoint-dir")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
