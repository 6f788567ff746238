"""A worker for tests/test_launch.py, run as ``python -m tests._launch_worker MODE DIR K``.

It records its pid and environment in DIR, then behaves according to MODE, where rank K is
the one that misbehaves. Workers that "block" sleep until killed: they never exit on their
own, so the tests prove that the launcher stops them.

Modes:
    ok                 every rank exits 0.
    exit               rank K exits 3 once the others are ready; the others start a
                       grandchild and block.
    sigkill            rank K SIGKILLs itself once the others are ready; the others block.
    fail_then_sigkill  rank (K+1) % world exits 1 once all are ready; rank K SIGKILLs itself
                       right after it sees that rank die (K must still be named).
    ignore_term        like exit, but every rank ignores SIGTERM (needs SIGKILL).
    grandchild         rank K starts a grandchild that would outlive it; all exit 0.
    block              every rank blocks; SIGINT / SIGTERM are recorded in sig.RANK.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.distributed import scaled

_DEADLINE_S = scaled(30.0)


def _write(path: Path, text: str) -> None:
    # Write then rename, so a reader polling for the file never sees it half written.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"worker gave up waiting for {what}")
        time.sleep(0.01)


def _block() -> None:
    while True:
        time.sleep(3600)


def _spawn_grandchild(out: Path, rank: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"])
    _write(out / f"gpid.{rank}", str(child.pid))


def _wait_exit(pid: int) -> None:
    # A pidfd works for any process of ours, not only children; it is readable once pid died.
    fd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(_DEADLINE_S * 1000)):
        sys.exit(f"worker gave up waiting for pid {pid} to exit")


def main() -> None:
    mode, out, k = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "GRADSYNC_LAUNCHED", "GLOO_SOCKET_IFNAME", "GRADSYNC_TEST_EXTRA"]
    _write(out / f"env.{rank}.json", json.dumps({key: os.environ.get(key) for key in keys}))
    _write(out / f"proc.{rank}.json", json.dumps({
        "ppid": os.getppid(), "sid": os.getsid(0), "argv0": sys.argv[0],
        "comm": Path("/proc/self/comm").read_text().strip()}))
    _write(out / f"pid.{rank}", str(os.getpid()))

    def others_ready() -> bool:
        return all((out / f"ready.{r}").exists() for r in range(world) if r != rank)

    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "block":
        def record(signum: int, frame: object) -> None:
            _write(out / f"sig.{rank}", signal.Signals(signum).name)
            sys.exit(1)
        signal.signal(signal.SIGINT, record)
        signal.signal(signal.SIGTERM, record)

    if mode == "ok":
        return
    if mode == "grandchild":
        if rank == k:
            _spawn_grandchild(out, rank)
        return
    if mode in ("exit", "ignore_term", "sigkill") and rank == k:
        _wait_for(others_ready, "the other ranks")
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(3)
    if mode == "fail_then_sigkill":
        first = (k + 1) % world
        if rank == first:
            _wait_for(others_ready, "the other ranks")
            sys.exit(1)
        if rank == k:
            _wait_for(lambda: (out / f"pid.{first}").exists(), f"rank {first}")
            _write(out / f"ready.{rank}", "")
            _wait_exit(int((out / f"pid.{first}").read_text()))
            os.kill(os.getpid(), signal.SIGKILL)
    if mode in ("exit", "ignore_term"):
        _spawn_grandchild(out, rank)
    _write(out / f"ready.{rank}", "")
    _block()


if __name__ == "__main__":
    main()
