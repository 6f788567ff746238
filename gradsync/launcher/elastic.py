"""Supervise an elastic job: a lost worker does not stop the others, a replacement may start.

    result = run_elastic(cmd, env_of, range(4), policy, max_restarts=1)

Workers are numbered by member id (``uid``): 0..N-1 first, then N, N+1, ... for
replacements (``policy.new_uid()``). When a worker exits with a failure that it did not explain itself (a signal,
or exit code 1), ``policy.lost(uid)`` decides whether the others go on (the coordinator of
gradsync/comm/elastic.py, which publishes the next generation); while restarts remain a
replacement is started and announced with ``policy.started(uid)``. ``policy.poll()`` runs
every ``poll_s`` seconds (it admits replacements that are ready) and returns the workers it
declares lost, alive but silent (no heartbeat: stopped or hung): each is named on one line
and its process group SIGKILLed, so that its exit is a loss like any other. A worker that exits with
a self-explained code (2, 3, 130: a user error, an agreed stop, an interrupt), or a loss
the policy refuses, stops the run the usual way, on one line that names the policy's
``stop_reason`` when it has one: the others get a grace period, then SIGTERM, then
SIGKILL. Every worker's process group is killed before returning. No torch
import here: the policy is handed in.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from . import procs
from .procs import Worker
from .supervise import _TERM_WAIT_S, SELF_EXPLAINED, LaunchResult

logger = logging.getLogger(__name__)

_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


class ElasticPolicy(Protocol):
    def lost(self, uid: int) -> bool: ...
    def started(self, uid: int) -> None: ...
    def finished(self, uid: int) -> None: ...
    def poll(self) -> dict[int, float]: ...
    def new_uid(self) -> int: ...


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler while :func:`run_elastic` supervises."""
    raise _Terminated


def _start(workers: list[Worker], uid: int, cmd: list[str],
           env_of: Callable[[int], dict[str, str]], launcher: int, in_main: bool) -> None:
    """Start worker ``uid`` and record it in ``workers`` before an interrupt can arrive (one
    inside Popen, after the fork, would lose a child we never learnt about)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
    try:
        workers.append(procs.start(uid, cmd, env_of(uid), procs.make_preexec(launcher, mask),
                                   piped=False))
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _supervise(workers: list[Worker], start: Callable[[int], None], policy: ElasticPolicy,
               max_restarts: int, grace_s: float, poll_s: float) -> LaunchResult:
    """Watch the workers until all have ended or a failure stops the run; replace the lost
    ones (numbered by ``policy.new_uid()``) while restarts remain."""
    restarts = 0
    while procs.running(workers):
        _kill_silent(workers, policy.poll())
        for w in procs.poll_exits(workers, poll_s):
            assert w.exit is not None
            if not w.exit.failed:
                policy.finished(w.rank)
                continue
            # A self-explained exit stops the run too; the policy may still know why (an
            # elastic worker exits 3 when the store says stop).
            if w.exit.returncode in SELF_EXPLAINED or not policy.lost(w.rank):
                return _stop(workers, w, grace_s, getattr(policy, "stop_reason", ""))
            print(f"gradsync: worker {w.rank} {w.exit.describe()}; the others go on",
                  file=sys.stderr, flush=True)
            if restarts < max_restarts:
                restarts += 1
                uid = policy.new_uid()
                policy.started(uid)
                start(uid)
    return LaunchResult(returncode=0)


def _kill_silent(workers: list[Worker], silent: dict[int, float]) -> None:
    """SIGKILL the process group of each running worker the policy declared lost (uid ->
    seconds without a heartbeat); SIGKILL ends a stopped process too."""
    for w in procs.running(workers):
        if w.rank in silent:
            print(f"gradsync: worker {w.rank} sent no heartbeat for {silent[w.rank]:.1f} s "
                  "(stopped or hung); declaring it lost", file=sys.stderr, flush=True)
            procs.signal_groups([w], signal.SIGKILL)


def run_elastic(cmd: list[str], env_of: Callable[[int], dict[str, str]],
                uids: Sequence[int], policy: ElasticPolicy, *, max_restarts: int = 0,
                grace_s: float = 5.0, poll_s: float = 0.05) -> LaunchResult:
    """Run ``cmd`` as the elastic workers ``uids`` (environment ``env_of(uid)``) until every
    worker has ended.

    Returns:
        returncode 0 when the run ended without a stopping failure (lost workers the policy
        let go are reported on stderr, not counted); else the stopping worker's code.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    workers: list[Worker] = []
    launcher = os.getpid()

    def start(uid: int) -> None:
        _start(workers, uid, cmd, env_of, launcher, in_main)

    try:
        for uid in uids:
            start(uid)
        return _supervise(workers, start, policy, max_restarts, grace_s, poll_s)
    except (KeyboardInterrupt, _Terminated) as exc:
        sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        try:
            procs.signal_groups(workers, sig)
            procs.wait_all(workers, grace_s)
        except (KeyboardInterrupt, _Terminated):
            pass
        return LaunchResult(128 + sig, None, f"launcher got {sig.name}")
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
        try:
            procs.reap(workers)
        finally:
            if mask is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _stop(workers: list[Worker], root: Worker, grace_s: float, why: str = "") -> LaunchResult:
    """The usual end of a failed run: name the root cause (a worker that explained its own
    exit is named only with the reason ``why`` the policy gives), let the others exit, stop
    them."""
    assert root.exit is not None
    line = (f"worker rank {root.rank} {root.exit.describe()}; {why + ': ' if why else ''}"
            "stopping the other workers")
    if root.exit.returncode not in SELF_EXPLAINED or why:
        print(f"gradsync: {line}", file=sys.stderr, flush=True)
    if not procs.wait_all(workers, grace_s):
        procs.signal_groups(workers, signal.SIGTERM)
        if not procs.wait_all(workers, _TERM_WAIT_S):
            procs.signal_groups(workers, signal.SIGKILL)
    return LaunchResult(root.exit.returncode, root.rank, root.exit.describe())
