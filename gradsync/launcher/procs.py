"""The primitives under :mod:`gradsync.launcher.supervise`: start a rank's process in its own
process group, see it exit without reaping it, signal its group, and reap it at the very end.

Linux only (prctl, pidfd, waitid).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KILL_WAIT_S = 5.0  # after SIGKILL, before giving up on a reap
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class Exit:
    """How a rank ended: its exit code, or the signal that killed it."""

    rank: int
    value: int
    signalled: bool
    core_dumped: bool = False

    @property
    def failed(self) -> bool:
        return self.signalled or self.value != 0

    @property
    def returncode(self) -> int:
        return 128 + self.value if self.signalled else self.value

    def describe(self) -> str:
        if not self.signalled:
            return f"exited with code {self.value}"
        try:
            name = signal.Signals(self.value).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {self.value}"
        return f"killed by {name}" + (" (core dumped)" if self.core_dumped else "")


@dataclass
class ForkedRank:
    """The part of ``subprocess.Popen`` that the supervision uses, for a rank forked by a
    zygote (zygote.py), a child of this process all the same."""

    pid: int
    args: list[str]
    stdout: None = None
    stderr: None = None
    returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        fd = os.pidfd_open(self.pid)
        try:
            ready = select.select([fd], [], [], timeout)[0]
        finally:
            os.close(fd)
        if not ready:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


@dataclass
class Worker:
    """The process of one rank."""

    rank: int
    proc: subprocess.Popen[bytes] | ForkedRank
    pidfd: int | None
    exit: Exit | None = None  # set once seen exited; the process stays unreaped till the end


def make_preexec(launcher_pid: int, mask: set[signal.Signals] | None) -> Callable[[], None]:
    """The ``preexec_fn`` of every rank; ``mask`` is the signal mask to restore in the child."""
    # Resolve prctl before forking: loading a library in the forked child could deadlock on
    # a lock held by another thread of the parent.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        # Runs in the child between fork and exec, after start_new_session's setsid().
        # The kernel SIGKILLs the child when the launcher (the forking thread) dies.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
        if mask is not None:  # exec keeps the signal mask: undo the launcher's blocking
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    return preexec


def start(rank: int, cmd: list[str], env: dict[str, str], preexec: Callable[[], None],
          piped: bool) -> Worker:
    """Start ``cmd``; ``piped``: stdin is /dev/null and stdout / stderr are pipes."""
    stdin, out = (subprocess.DEVNULL, subprocess.PIPE) if piped else (None, None)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=stdin,
        stdout=out,
        stderr=out,
        # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it,
        # and killpg reaches the rank's grandchildren too.
        start_new_session=True,
        preexec_fn=preexec,
    )
    return adopt(rank, proc)


def adopt(rank: int, proc: subprocess.Popen[bytes] | ForkedRank) -> Worker:
    """The Worker of ``proc``, a child of this process in its own session (start, or a
    rank that a zygote forked: zygote.py)."""
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll_exits ticks instead
        pidfd = None
    return Worker(rank, proc, pidfd)


def running(workers: list[Worker]) -> list[Worker]:
    return [w for w in workers if w.exit is None]


def signal_groups(workers: list[Worker], sig: signal.Signals) -> None:
    for w in workers:
        # Workers are reaped only at the very end (reap), so a worker's pid, which is also
        # its process group id, cannot have been reused: killpg cannot hit a stranger.
        try:
            os.killpg(w.proc.pid, sig)
        except ProcessLookupError:  # the whole group is already gone
            pass


def poll_exits(workers: list[Worker], timeout: float | None) -> list[Worker]:
    """Block up to ``timeout`` seconds (None: forever) until a running worker exits.

    Returns the workers newly seen exited, with ``exit`` set; WNOWAIT leaves them unreaped.
    """
    alive = running(workers)
    if all(w.pidfd is not None for w in alive):
        poller = select.poll()
        for w in alive:
            poller.register(w.pidfd, select.POLLIN)  # readable once the process has exited
        poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
    else:
        time.sleep(0.05 if timeout is None else max(0.0, min(timeout, 0.05)))
    exited = []
    for w in alive:
        info = os.waitid(os.P_PID, w.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None or not info.si_pid:
            continue
        signalled = info.si_code != os.CLD_EXITED
        w.exit = Exit(w.rank, info.si_status, signalled, info.si_code == os.CLD_DUMPED)
        logger.debug("worker rank %d %s", w.rank, w.exit.describe())
        exited.append(w)
    return exited


def wait_all(workers: list[Worker], timeout: float) -> bool:
    """Wait until every worker has exited or ``timeout`` passed; True if all exited."""
    deadline = time.monotonic() + timeout
    while running(workers):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poll_exits(workers, left)
    return True


def reap(workers: list[Worker]) -> None:
    """SIGKILL every worker's process group (grandchildren too), then reap the workers."""
    signal_groups(workers, signal.SIGKILL)
    for w in workers:
        try:
            w.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # stuck in uninterruptible sleep; nothing to do
            logger.warning("worker rank %d (pid %d) did not die", w.rank, w.proc.pid)
        if w.pidfd is not None:
            os.close(w.pidfd)
