"""Start and supervise the worker processes of one machine (a tiny, single-node torchrun).

    result = launch(["train", "--epochs=1"], nprocs=4)  # 4 x `python -m gradsync train ...`

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
GRADSYNC_LAUNCHED=1. When a worker fails the launcher names the rank that caused it, gives the
others a grace period, then stops them; no worker or grandchild outlives ``launch``.
Linux only (prctl, pidfd, waitid). No torch import: the launcher must start fast, and only
``gradsync.comm`` talks to torch.distributed.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# A rank that dies from a signal (OOM killer, SIGKILL) makes its peers fail with connection
# errors milliseconds later, and the launcher may see those first: for this long after the
# first failure, a signalled worker replaces a non-zero exit as the root cause. No worker
# is signalled by the launcher before the window closes, even when grace_s is shorter.
_ROOT_CAUSE_WINDOW_S = 1.0
# Wait after SIGTERM before SIGKILL, and after SIGKILL before giving up on a reap.
_TERM_WAIT_S = 3.0
_KILL_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


class LaunchError(Exception):
    """A problem the user can fix (bad nprocs, port in use); the message is one line."""


class _LauncherTerminated(Exception):
    """Raised from the SIGTERM handler to leave the supervision loop."""


@dataclass
class LaunchResult:
    """Outcome of :func:`launch`.

    ``returncode`` is 0 when every worker exited 0; otherwise the root-cause worker's exit
    code, 128 + signal number if it was killed by a signal (the shell's convention), or
    130 / 143 if the launcher itself was interrupted by SIGINT / SIGTERM.
    """

    returncode: int
    failed_rank: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _Exit:
    """How a worker ended: its exit code, or the signal that killed it."""

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
class _Worker:
    rank: int
    proc: subprocess.Popen[bytes]
    pidfd: int | None
    exit: _Exit | None = None  # set once seen exited; the process stays unreaped till the end


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:  # a host name: let the engine resolve it
        return False


def _bind(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Mirror the rendezvous store, which sets SO_REUSEADDR: a port left in TIME_WAIT by the
    # previous run is usable, only a live listener makes bind fail.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


def find_free_port(addr: str = "127.0.0.1") -> int:
    """Ask the kernel for a TCP port that is free on ``addr`` right now.

    Another process may still take it before the rendezvous store binds it (an inherent
    race); pass an explicit port where that matters.

    Args:
        addr: the address the rendezvous store will listen on.

    Returns:
        A free port number.

    Raises:
        LaunchError: if ``addr`` cannot be bound (not an address of this machine).
    """
    try:
        with _bind(addr, 0) as sock:
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise LaunchError(f"cannot bind a port on {addr}: {exc.strerror}") from exc


def check_port_free(addr: str, port: int) -> None:
    """Fail early, with a clear message, if ``port`` is taken on ``addr``.

    Args:
        addr: the master address.
        port: the master port.

    Raises:
        LaunchError: if the port is out of range, in use, or ``addr`` cannot be bound.
    """
    if not 1 <= port <= 65535:
        raise LaunchError(f"port {port} is out of range; choose one in 1-65535 with --port")
    try:
        _bind(addr, port).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LaunchError(
                f"port {port} on {addr} is already in use; choose another with --port"
            ) from exc
        raise LaunchError(f"cannot bind {addr}:{port}: {exc.strerror}") from exc


def _worker_env(
    rank: int, nprocs: int, addr: str, port: int, extra: dict[str, str] | None
) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        GRADSYNC_LAUNCHED="1",
    )
    # Without this gloo binds the interface its host name resolves to, which exposes the
    # workers' sockets on the network even though the job is purely local.
    if _is_loopback(addr) and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _make_preexec(launcher_pid: int, mask: set[signal.Signals] | None) -> Callable[[], None]:
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


def _start(rank: int, cmd: list[str], env: dict[str, str], preexec: Callable[[], None]) -> _Worker:
    proc = subprocess.Popen(
        cmd,
        env=env,
        # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it,
        # and killpg reaches the worker's grandchildren too.
        start_new_session=True,
        preexec_fn=preexec,
    )
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3: _poll_exits ticks instead
        pidfd = None
    return _Worker(rank, proc, pidfd)


def _running(workers: list[_Worker]) -> list[_Worker]:
    return [w for w in workers if w.exit is None]


def _signal_groups(workers: list[_Worker], sig: signal.Signals) -> None:
    for w in workers:
        # Workers are reaped only at the very end of launch(), so a worker's pid, which is
        # also its process group id, cannot have been reused: killpg cannot hit a stranger.
        try:
            os.killpg(w.proc.pid, sig)
        except ProcessLookupError:  # the whole group is already gone
            pass


def _poll_exits(workers: list[_Worker], timeout: float | None) -> list[_Worker]:
    """Block up to ``timeout`` seconds (None: forever) until a running worker exits.

    Returns the workers newly seen exited, with ``exit`` set; WNOWAIT leaves them unreaped.
    """
    running = _running(workers)
    if all(w.pidfd is not None for w in running):
        poller = select.poll()
        for w in running:
            poller.register(w.pidfd, select.POLLIN)  # readable once the process has exited
        poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
    else:
        time.sleep(0.05 if timeout is None else max(0.0, min(timeout, 0.05)))
    exited = []
    for w in running:
        info = os.waitid(os.P_PID, w.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None or not info.si_pid:
            continue
        signalled = info.si_code != os.CLD_EXITED
        w.exit = _Exit(w.rank, info.si_status, signalled, info.si_code == os.CLD_DUMPED)
        logger.debug("worker rank %d %s", w.rank, w.exit.describe())
        exited.append(w)
    return exited


def _wait_all(workers: list[_Worker], timeout: float) -> bool:
    """Wait until every worker has exited or ``timeout`` passed; True if all exited."""
    deadline = time.monotonic() + timeout
    while _running(workers):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        _poll_exits(workers, left)
    return True


def _root_cause(root: _Exit | None, exited: list[_Worker]) -> _Exit | None:
    """The first failure, unless a signalled worker follows a mere non-zero exit."""
    for w in exited:
        assert w.exit is not None
        if w.exit.failed and (root is None or (w.exit.signalled and not root.signalled)):
            root = w.exit
    return root


def _supervise(workers: list[_Worker], grace_s: float, tolerate: frozenset[int]) -> LaunchResult:
    def failures(exited: list[_Worker]) -> list[_Worker]:
        """Exits that stop the run; a tolerated rank's failure is only reported."""
        for w in exited:
            if w.rank in tolerate and w.exit is not None and w.exit.failed:
                print(f"gradsync: worker rank {w.rank} {w.exit.describe()}; the others go on",
                      file=sys.stderr, flush=True)
        return [w for w in exited if w.rank not in tolerate]

    root = None
    while root is None and _running(workers):
        root = _root_cause(None, failures(_poll_exits(workers, None)))
    if root is None:
        return LaunchResult(returncode=0)
    failed_at = time.monotonic()
    window_end = failed_at + _ROOT_CAUSE_WINDOW_S
    while not root.signalled and _running(workers) and time.monotonic() < window_end:
        root = _root_cause(root, failures(_poll_exits(workers, window_end - time.monotonic())))
        assert root is not None
    line = f"worker rank {root.rank} {root.describe()}; stopping the other workers"
    logger.info(line)
    print(f"gradsync: {line}", file=sys.stderr, flush=True)
    # Peers usually fail on their own once their connection to the dead rank drops.
    if not _wait_all(workers, failed_at + grace_s - time.monotonic()):
        _signal_groups(workers, signal.SIGTERM)
        if not _wait_all(workers, _TERM_WAIT_S):
            _signal_groups(workers, signal.SIGKILL)
    return LaunchResult(root.returncode, root.rank, root.describe())


def _cleanup(workers: list[_Worker]) -> None:
    """SIGKILL every worker's process group (grandchildren too), then reap the workers."""
    _signal_groups(workers, signal.SIGKILL)
    for w in workers:
        try:
            w.proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # stuck in uninterruptible sleep; nothing to do
            logger.warning("worker rank %d (pid %d) did not die", w.rank, w.proc.pid)
        if w.pidfd is not None:
            os.close(w.pidfd)


def launch(
    argv: list[str],
    nprocs: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    env: dict[str, str] | None = None,
    grace_s: float = 5.0,
    module: str = "gradsync",
    tolerate: frozenset[int] = frozenset(),
) -> LaunchResult:
    """Run ``python -m module *argv`` in ``nprocs`` worker processes and supervise them.

    Workers inherit stdout/stderr and run in their own process groups; each dies with the
    launcher (PR_SET_PDEATHSIG). When a worker fails, the others get ``grace_s`` seconds
    to exit on their own, then SIGTERM, then SIGKILL. SIGINT / SIGTERM sent to the launcher
    are forwarded to the workers. Every worker process group is killed before returning.

    Args:
        argv: arguments after ``python -m module``.
        nprocs: number of workers (the world size on this machine).
        master_addr: rendezvous address; a loopback address also sets GLOO_SOCKET_IFNAME=lo
            unless it is already set.
        master_port: rendezvous port; None picks a free one.
        env: extra environment variables for the workers (the rendezvous ones win).
        grace_s: seconds the surviving workers get to exit after the first failure.
        module: the module the workers run.
        tolerate: ranks whose failure is reported but does not stop the others (the
            workers of an asynchronous parameter server, which the servers drop).

    Returns:
        A LaunchResult naming the root-cause rank and reason when a worker failed.

    Raises:
        LaunchError: for a bad ``nprocs`` or an unusable address / port.
    """
    if nprocs < 1:
        raise LaunchError(f"nprocs must be at least 1, got {nprocs}")
    if master_port is None:
        master_port = find_free_port(master_addr)
    else:
        check_port_free(master_addr, master_port)
    logger.info(
        "launching %d workers of `python -m %s` on %s:%d", nprocs, module, master_addr, master_port
    )

    def on_sigterm(signum: int, frame: object) -> None:
        raise _LauncherTerminated

    # signal.signal only works in the main thread; elsewhere SIGTERM keeps its disposition
    # and the workers still die with the launcher through PDEATHSIG.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    workers: list[_Worker] = []
    cmd = [sys.executable, "-m", module, *argv]
    try:
        # An interrupt inside Popen, after the fork, would lose a child we never learnt
        # about, so interrupts wait until every worker is recorded in `workers`.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
        try:
            preexec = _make_preexec(os.getpid(), mask)
            for rank in range(nprocs):
                env_r = _worker_env(rank, nprocs, master_addr, master_port, env)
                workers.append(_start(rank, cmd, env_r, preexec))
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C fires here
        return _supervise(workers, grace_s, frozenset(tolerate))
    except (KeyboardInterrupt, _LauncherTerminated) as exc:
        sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        logger.info("launcher got %s; forwarding it to the workers", sig.name)
        try:
            _signal_groups(workers, sig)
            _wait_all(workers, grace_s)
        except (KeyboardInterrupt, _LauncherTerminated):
            pass  # a second interrupt: skip the wait, the finally block SIGKILLs the rest
        return LaunchResult(128 + sig, None, f"launcher got {sig.name}")
    finally:
        # A second Ctrl-C must not cut the cleanup short; it is delivered, to the caller's
        # handlers, once the workers are gone.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
        try:
            _cleanup(workers)
        finally:
            if mask is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
