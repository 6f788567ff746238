"""--frontends N: N front processes accepting on the one listening socket.

One front's event loop parses every request, so on a tiny model its core is the bound (issue
23: about 3,450 requests/s at 0.93 of a core). The first front (the process the user
started) binds the socket, then forks N - 1 more before any event loop or replica exists;
they inherit the socket and the kernel hands each connection to whichever front accepts it
first (an idle front wins more often than a busy one). Each front is a whole server: its own
replicas of every model (N x --replicas in all), batchers and /metrics counts; nothing is
shared between fronts but the socket, so no request waits on another process's loop.

The first front prints the start-up line once every front is ready, forwards a SIGTERM or
SIGINT that reached only it to the others, and waits for them before it exits. A forked
front gets SIGTERM if the first dies (PR_SET_PDEATHSIG), so none outlives it. A front that
dies while serving is not replaced: the others keep accepting on the port.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

from .model import ServeError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # as replicas.START_TIMEOUT_S: the others start their replicas too
_PR_SET_PDEATHSIG = 1


class Fronts:
    """This process's place among the fronts.

    Attributes:
        index: 0 in the first front (the parent), 1..N-1 in the forked ones.
        others: the forked fronts' pids (in the first front only).
    """

    def __init__(self, index: int, others: list[int], ready_fd: int | None):
        self.index = index
        self.others = others
        self._ready_fd = ready_fd  # the read end (first front) or write end (the others)

    @classmethod
    def fork(cls, count: int) -> Fronts:
        """Fork ``count - 1`` fronts; returns this process's place (call before any event
        loop, thread or replica exists: a fork copies only the calling thread)."""
        if count == 1:
            return cls(0, [], None)
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        others = []
        for index in range(1, count):
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _die_with_parent()
                return cls(index, [], write)
            others.append(pid)
        os.close(write)
        return cls(0, others, read)

    async def started(self) -> None:
        """A forked front says it is ready; the first waits until every other one is.

        Raises:
            ServeError: a front exited before it was ready (it said why on stderr).
        """
        if self._ready_fd is None:
            return
        fd, self._ready_fd = self._ready_fd, None
        if self.index:
            os.write(fd, b"1")
            os.close(fd)
            return
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(_read_all, fd, len(self.others)),
                                           START_TIMEOUT_S)
        except asyncio.TimeoutError:
            ready = -1
        finally:
            os.close(fd)
        if ready != len(self.others):
            raise ServeError(f"{len(self.others) - max(ready, 0)} of the {len(self.others) + 1}"
                             " front processes could not start")

    def stop_others(self) -> None:
        """SIGTERM to the forked fronts still running: they shut down as the first does."""
        for pid in self.others:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_others(self) -> None:
        """Reap the forked fronts (each finishes its requests in flight first)."""
        for pid in self.others:
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            if os.waitstatus_to_exitcode(status) not in (0, 130):
                log.warning("front process %d exited with status %d", pid,
                            os.waitstatus_to_exitcode(status))
        self.others = []


def _read_all(fd: int, count: int) -> int:
    """Bytes read from ``fd`` until ``count`` or end of file (every writer closed)."""
    got = 0
    while got < count:
        chunk = os.read(fd, count - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def _die_with_parent() -> None:
    """SIGTERM this process when its parent (the first front) dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the others outlive a killed first front
        pass
