"""Start one process per rank and supervise them until every one has ended.

    result = run_processes([cmd] * 4, [env_of(rank) for rank in range(4)])

The supervision behind :func:`gradsync.launcher.launch` (ranks on this machine) and
:func:`gradsync.lab.run.run_command` (ranks inside a lab's namespaces). Each rank has its own
session and process group and dies with this process (PR_SET_PDEATHSIG). When a rank fails,
the rank that caused it is named, the others get a grace period, then SIGTERM, then SIGKILL;
SIGINT / SIGTERM sent to this process are forwarded; no rank or grandchild outlives
:func:`run_processes`. Linux only; the primitives are in :mod:`gradsync.launcher.procs`. No
torch import: launchers must start fast, and only ``gradsync.comm`` talks to torch.distributed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .. import env as gradsync_env
from .. import exits
from . import procs
from .procs import Exit, Worker
from . import zygote as zygotes
from .zygote import common

logger = logging.getLogger(__name__)

# A rank that dies from a signal (OOM killer, SIGKILL) makes its peers fail with connection
# errors milliseconds later, and the supervisor may see those first: for this long after the
# first failure, a signalled rank replaces a non-zero exit as the root cause. No rank is
# signalled by the supervisor before the window closes, even when grace_s is shorter.
_ROOT_CAUSE_WINDOW_S = 1.0
_TERM_WAIT_S = 3.0  # after SIGTERM, before SIGKILL
_PUMP_JOIN_S = 5.0  # after the last reap, for the reader threads to reach the pipes' end
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}
EXIT_TIMEOUT = 124  # as timeout(1)
# Exit codes of a rank that has already said why in one line, by the convention of `gradsync`
# ranks (a user error, a stop all ranks agreed on, an interrupt): the supervisor and the CLI
# add no story of their own.
SELF_EXPLAINED = exits.SELF_EXPLAINED

OnLine = Callable[[int, str, str], None]
"""``on_line(rank, stream, line)``, stream "stdout" or "stderr", line without its newline;
called from one reader thread per stream, so it must be thread-safe."""


class _LauncherTerminated(Exception):
    """Raised from the SIGTERM handler to leave the supervision loop."""


def _raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler while :func:`run_processes` supervises."""
    raise _LauncherTerminated


@dataclass
class LaunchResult:
    """Outcome of :func:`run_processes` (and so of :func:`gradsync.launcher.launch`).

    ``returncode`` is 0 when every rank exited 0; otherwise the root-cause rank's exit
    code, 128 + signal number if it was killed by a signal (the shell's convention), 124
    if the run timed out, or 130 / 143 if this process was interrupted by SIGINT / SIGTERM.
    """

    returncode: int
    failed_rank: int | None = None
    reason: str | None = None


def _root_cause(root: Exit | None, exited: list[Worker]) -> Exit | None:
    """The first failure, unless a signalled rank follows a mere non-zero exit."""
    for w in exited:
        assert w.exit is not None
        if w.exit.failed and (root is None or (w.exit.signalled and not root.signalled)):
            root = w.exit
    return root


def _supervise(workers: list[Worker], grace_s: float, tolerate: frozenset[int]) -> LaunchResult:
    def failures(exited: list[Worker]) -> list[Worker]:
        """Exits that stop the run; a tolerated rank's failure is only reported."""
        for w in exited:
            if w.rank in tolerate and w.exit is not None and w.exit.failed:
                print(f"gradsync: worker rank {w.rank} {w.exit.describe()}; the others go on",
                      file=sys.stderr, flush=True)
        return [w for w in exited if w.rank not in tolerate]

    root = None
    while root is None and procs.running(workers):
        root = _root_cause(None, failures(procs.poll_exits(workers, None)))
    if root is None:
        return LaunchResult(returncode=0)
    failed_at = time.monotonic()
    window_end = failed_at + _ROOT_CAUSE_WINDOW_S
    while not root.signalled and procs.running(workers) and time.monotonic() < window_end:
        root = _root_cause(root, failures(procs.poll_exits(workers, window_end - time.monotonic())))
        assert root is not None
    line = f"worker rank {root.rank} {root.describe()}; stopping the other workers"
    logger.info(line)
    if root.returncode not in SELF_EXPLAINED:
        print(f"gradsync: {line}", file=sys.stderr, flush=True)
    # Peers usually fail on their own once their connection to the dead rank drops.
    if not procs.wait_all(workers, failed_at + grace_s - time.monotonic()):
        procs.signal_groups(workers, signal.SIGTERM)
        if not procs.wait_all(workers, _TERM_WAIT_S):
            procs.signal_groups(workers, signal.SIGKILL)
    return LaunchResult(root.returncode, root.rank, root.describe())


def _pump(pipe: IO[bytes], rank: int, stream: str, on_line: OnLine) -> None:
    with pipe:
        for raw in iter(pipe.readline, b""):
            on_line(rank, stream, raw.decode(errors="replace").rstrip("\n"))


def _watchdog(workers: list[Worker], timeout_s: float, stop: threading.Event,
              fired: threading.Event) -> None:
    if stop.wait(timeout_s):
        return
    fired.set()
    print(f"gradsync: run timed out after {timeout_s:g} s; stopping every rank",
          file=sys.stderr, flush=True)
    procs.signal_groups(workers, signal.SIGTERM)
    if not stop.wait(_TERM_WAIT_S):
        procs.signal_groups(workers, signal.SIGKILL)


def _start_all(cmds: list[list[str]], envs: list[dict[str, str]], workers: list[Worker],
               piped: bool, in_main: bool, forked: bool = False) -> None:
    """Start every rank, appending each to ``workers`` as soon as it exists (so that the
    caller's cleanup reaches the ranks already started if a later one fails); ``forked``:
    fork the `python -m MODULE` ranks from a zygote that imported torch once."""
    # An interrupt inside Popen, after the fork, would lose a child we never learnt
    # about, so interrupts wait until every rank is recorded in `workers`.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
    try:
        preexec = procs.make_preexec(os.getpid(), mask)
        if forked and not piped:
            with zygotes.take(cmds[0][2], common(envs), preexec) as zygote:
                for rank, (cmd, env) in enumerate(zip(cmds, envs)):
                    workers.append(procs.adopt(rank, zygote.fork(cmd[3:], env)))
            return
        for rank, (cmd, env) in enumerate(zip(cmds, envs)):
            workers.append(procs.start(rank, cmd, env, preexec, piped=piped))
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C fires here


def _pumps(workers: list[Worker], on_line: OnLine) -> list[threading.Thread]:
    """One reader thread per rank and stream, not started yet."""
    return [threading.Thread(target=_pump, args=(pipe, w.rank, stream, on_line), daemon=True)
            for w in workers
            for pipe, stream in ((w.proc.stdout, "stdout"), (w.proc.stderr, "stderr"))]


def _forward_interrupt(workers: list[Worker], sig: signal.Signals,
                       grace_s: float) -> LaunchResult:
    """Pass an interrupt of this process on to the ranks and give them ``grace_s`` to exit."""
    logger.info("launcher got %s; forwarding it to the workers", sig.name)
    try:
        procs.signal_groups(workers, sig)
        procs.wait_all(workers, grace_s)
    except (KeyboardInterrupt, _LauncherTerminated):
        pass  # a second interrupt: skip the wait, the caller's cleanup SIGKILLs the rest
    return LaunchResult(128 + sig, None, f"launcher got {sig.name}")


def _clean_up(workers: list[Worker], pumps: list[threading.Thread], in_main: bool,
              previous_sigterm: object) -> None:
    """Kill and reap every rank's group, let the readers drain, restore SIGTERM's handler."""
    # A second Ctrl-C must not cut the cleanup short; it is delivered, to the caller's
    # handlers, once the ranks are gone.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
    try:
        procs.reap(workers)
        deadline = time.monotonic() + _PUMP_JOIN_S
        for t in pumps:  # the groups are dead, so the pipes reach EOF
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
    finally:
        if mask is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_processes(cmds: list[list[str]], envs: list[dict[str, str]], *, grace_s: float = 5.0,
                  tolerate: frozenset[int] = frozenset(), timeout_s: float | None = None,
                  on_line: OnLine | None = None, fork: bool = False) -> LaunchResult:
    """Run ``cmds[rank]`` with environment ``envs[rank]`` for every rank and supervise them.

    When a rank fails, the others get ``grace_s`` seconds to exit on their own, then
    SIGTERM, then SIGKILL. SIGINT / SIGTERM sent to this process (in the main thread) are
    forwarded to the ranks. Every rank's process group is killed before returning.

    Args:
        cmds: one command per rank, the program first.
        envs: the whole environment of each rank.
        grace_s: seconds the surviving ranks get to exit after the first failure.
        tolerate: ranks whose failure is reported but does not stop the others.
        timeout_s: stop every rank after this many seconds and return code 124.
        on_line: called for each output line, from a reader thread per stream, with stdin
            /dev/null; None: the ranks inherit stdin, stdout and stderr.
        fork: every command is `python -m MODULE ...`, one module: fork the ranks from
            one process that imported it (and for gradsync, torch: zygote.py), unless
            GRADSYNC_ZYGOTE=0 or ``on_line``.

    Returns:
        A LaunchResult naming the root-cause rank and reason when a rank failed.

    Raises:
        ValueError: ``cmds`` and ``envs`` differ in length.
        OSError: a rank could not be started (the ranks already started are stopped).
    """
    if len(cmds) != len(envs):
        raise ValueError(f"{len(cmds)} commands but {len(envs)} environments")

    # signal.signal only works in the main thread; elsewhere SIGTERM keeps its disposition
    # and the ranks still die with this process through PDEATHSIG.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    workers: list[Worker] = []
    pumps: list[threading.Thread] = []
    stop, fired = threading.Event(), threading.Event()
    watchdog: threading.Thread | None = None
    try:
        forked = fork and gradsync_env.zygote(envs[0]) and all(
            c[:2] == [sys.executable, "-m"] and c[2] == cmds[0][2] for c in cmds)
        _start_all(cmds, envs, workers, on_line is not None, in_main, forked)
        # Threads start once every fork is done: preexec_fn runs Python in the forked child,
        # which must not find a lock held by another thread of ours.
        if on_line is not None:
            pumps = _pumps(workers, on_line)
            for pump in pumps:
                pump.start()
        if timeout_s is not None:
            watchdog = threading.Thread(target=_watchdog, args=(workers, timeout_s, stop, fired),
                                        daemon=True)
            watchdog.start()
        result = _supervise(workers, grace_s, frozenset(tolerate))
        if fired.is_set():
            return LaunchResult(EXIT_TIMEOUT, None, f"timed out after {timeout_s:g} s")
        return result
    except (KeyboardInterrupt, _LauncherTerminated) as exc:
        sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        return _forward_interrupt(workers, sig, grace_s)
    finally:
        stop.set()
        if watchdog is not None:  # it must not signal a group once the ranks are reaped
            watchdog.join()
        _clean_up(workers, pumps, in_main, previous)
