"""A memory cgroup with a limit, for one benchmark launch (`gradsync bench memory --limit-mib`).

cgroup v2 (``memory.max``, peak ``memory.peak``) or v1 (``memory.limit_in_bytes``, peak
``memory.max_usage_in_bytes``), created under /sys/fs/cgroup and removed after, so it needs
root. A launch that needs more than the limit is killed by the kernel's OOM killer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..exits import UserError


class MemoryCgroup:
    """``with MemoryCgroup(limit) as cg: subprocess.run(cg.prefix() + cmd)``; ``cg.peak()``.

    Raises:
        UserError: no memory controller, or the cgroup cannot be created (not root).
    """

    def __init__(self, limit_bytes: int, root: Path = Path("/sys/fs/cgroup")):
        v2 = root / "cgroup.controllers"
        name = f"gradsync-bench-{os.getpid()}"
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, self.limit_file, self.peak_file = (root / name, "memory.max",
                                                          "memory.peak")
        elif (root / "memory").is_dir():  # v1
            self.path, self.limit_file, self.peak_file = (
                root / "memory" / name, "memory.limit_in_bytes", "memory.max_usage_in_bytes")
        else:
            raise UserError(f"--limit-mib: no cgroup memory controller under {root}")
        self.limit = limit_bytes

    def __enter__(self) -> "MemoryCgroup":
        try:
            self.path.mkdir()
            (self.path / self.limit_file).write_text(str(self.limit))
        except OSError as e:
            raise UserError(f"--limit-mib: cannot create {self.path} ({e.strerror}); "
                            f"it needs root") from None
        return self

    def prefix(self) -> list[str]:
        # The shell moves itself into the cgroup, then becomes the launch: every rank it
        # starts is born inside.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def peak(self) -> int:
        """The most memory the cgroup held (bytes); 0 when unreadable."""
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the last exiting process may still be charged for a moment
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
