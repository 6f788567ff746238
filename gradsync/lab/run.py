"""Run a command once per process slot of a lab, inside the hosts' namespaces.

    rc = lab_launch(lab, ["train", "--arch", "allreduce"])    # python -m gradsync train ...
    rc = run_command(lab, ["python", "-m", "tests._lab_allreduce"])

Rank r runs on host r // procs_per_host through ``ip netns exec``, with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (host 0's lab address), MASTER_PORT and
GLOO_SOCKET_IFNAME (the host's lab interface) set. Output is streamed line by line as
``[rank N] ...``. Supervision is gradsync.launch's: when a rank fails the others get a
grace period, then SIGTERM, then SIGKILL; each rank has its own process group and dies with
the launcher (PR_SET_PDEATHSIG); every group is killed before returning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from .. import launch as _launch  # _TERM_WAIT_S is read at call time (tests shorten it)

# The launcher's supervision, reused as is: only how a worker is started differs here
# (inside a namespace, output piped and prefixed).
from ..launch import (_INTERRUPTS, _cleanup, _LauncherTerminated, _make_preexec, _signal_groups,
                      _supervise, _wait_all, _Worker)
from .cluster import Lab, up
from .netns import LabError

EXIT_TIMEOUT = 124  # as timeout(1)

OnLine = Callable[[int, str, str], None]
"""``on_line(rank, stream, line)``, stream "stdout" or "stderr", line without its newline;
called from one reader thread per stream, so it must be thread-safe."""

_print_lock = threading.Lock()


def _print_line(rank: int, stream: str, line: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    with _print_lock:
        out.write(f"[rank {rank}] {line}\n")
        out.flush()


def _pump(pipe: IO[bytes], rank: int, stream: str, on_line: OnLine) -> None:
    with pipe:
        for raw in iter(pipe.readline, b""):
            on_line(rank, stream, raw.decode(errors="replace").rstrip("\n"))


def slot_env(lab: Lab, rank: int, master_port: int,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process slot ``rank``: ``os.environ``, ``extra``, then the lab's."""
    host = lab.hosts[rank // lab.procs_per_host]
    env = {**os.environ, **(extra or {})}
    # Share the machine's cores between all ranks instead of one thread per core each.
    threads = str(max(1, (os.cpu_count() or 1) // lab.world_size))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines appear as they are printed
    env.update(RANK=str(rank), WORLD_SIZE=str(lab.world_size),
               LOCAL_RANK=str(rank % lab.procs_per_host),
               LOCAL_WORLD_SIZE=str(lab.procs_per_host), MASTER_ADDR=lab.master_addr,
               MASTER_PORT=str(master_port), GLOO_SOCKET_IFNAME=host.ifname,
               GRADSYNC_LAUNCHED="1", GRADSYNC_LAB=lab.name)
    return env


def _start(rank: int, cmd: list[str], env: dict[str, str], preexec) -> tuple[_Worker, list]:
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    return _Worker(rank, proc, pidfd), [proc.stdout, proc.stderr]


def _watchdog(workers: list[_Worker], timeout_s: float, stop: threading.Event,
              fired: threading.Event) -> None:
    if stop.wait(timeout_s):
        return
    fired.set()
    print(f"gradsync: lab run timed out after {timeout_s:g} s; stopping every rank",
          file=sys.stderr, flush=True)
    _signal_groups(workers, signal.SIGTERM)
    if not stop.wait(_launch._TERM_WAIT_S):
        _signal_groups(workers, signal.SIGKILL)


def run_command(lab: Lab, command: list[str], env: dict[str, str] | None = None, *,
                master_port: int = 29500, timeout_s: float | None = None,
                grace_s: float = 5.0, on_line: OnLine | None = None) -> int:
    """Run ``command`` once per process slot of ``lab`` and supervise the ranks.

    Args:
        lab: a lab that is up.
        command: the program and its arguments, run inside each host's namespace.
        env: extra environment variables (the lab's rendezvous variables win).
        master_port: rendezvous port on host 0.
        timeout_s: stop every rank after this many seconds and return 124.
        grace_s: after a rank fails, seconds the others get to exit on their own.
        on_line: called for each output line; default prints ``[rank N] line``.

    Returns:
        0 if every rank exited 0; else the failing rank's code (128 + signal if killed),
        124 on timeout, 130 / 143 if this process got SIGINT / SIGTERM.

    Raises:
        LabError: empty command or a bad port.
    """
    if not command:
        raise LabError("no command to run; put it after `--`")
    if not 1 <= master_port <= 65535:
        raise LabError(f"port {master_port} is out of range 1-65535")
    on_line = on_line or _print_line

    def on_sigterm(signum: int, frame: object) -> None:
        raise _LauncherTerminated

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    workers: list[_Worker] = []
    pumps: list[threading.Thread] = []
    stop, fired = threading.Event(), threading.Event()
    watchdog: threading.Thread | None = None
    try:
        # As in gradsync.launch: no interrupt between a fork and recording its worker.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
        try:
            preexec = _make_preexec(os.getpid(), mask)
            for rank in range(lab.world_size):
                cmd = lab.exec_argv(rank // lab.procs_per_host, command)
                worker, pipes = _start(rank, cmd, slot_env(lab, rank, master_port, env), preexec)
                workers.append(worker)
                pumps += [threading.Thread(target=_pump, args=(pipe, rank, stream, on_line),
                                           daemon=True)
                          for pipe, stream in zip(pipes, ("stdout", "stderr"))]
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Started once every fork is done: preexec_fn runs Python in the forked child, which
        # must not find a lock held by another thread of ours.
        for pump in pumps:
            pump.start()
        if timeout_s is not None:
            watchdog = threading.Thread(target=_watchdog, args=(workers, timeout_s, stop, fired),
                                        daemon=True)
            watchdog.start()
        result = _supervise(workers, grace_s, frozenset())
        return EXIT_TIMEOUT if fired.is_set() else result.returncode
    except (KeyboardInterrupt, _LauncherTerminated) as exc:
        sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        try:
            _signal_groups(workers, sig)
            _wait_all(workers, grace_s)
        except (KeyboardInterrupt, _LauncherTerminated):
            pass
        return 128 + sig
    finally:
        stop.set()
        if watchdog is not None:  # it must not signal a group once the workers are reaped
            watchdog.join()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS) if in_main else None
        try:
            _cleanup(workers)
            deadline = time.monotonic() + 5.0
            for t in pumps:  # the groups are dead, so the pipes reach EOF
                if t.is_alive():
                    t.join(max(0.0, deadline - time.monotonic()))
        finally:
            if mask is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def lab_launch(lab: Lab, argv: list[str], *, module: str = "gradsync",
               env: dict[str, str] | None = None, master_port: int = 29500,
               timeout_s: float | None = None, on_line: OnLine | None = None) -> int:
    """Run ``python -m module *argv`` once per process slot of ``lab``; see :func:`run_command`.

    Returns:
        0 if every rank succeeded, else non-zero (the failing rank's exit code).
    """
    return run_command(lab, [sys.executable, "-m", module, *argv], env,
                       master_port=master_port, timeout_s=timeout_s, on_line=on_line)


def train_in_lab(hosts: int, rate: str, rates: list[str] | None, argv: list[str],
                 env: dict[str, str] | None = None, *, procs_per_host: int = 1,
                 master_port: int = 29500) -> int:
    """``gradsync train --lab N --rate R``: bring a lab up, train across it, take it down.

    Args:
        hosts, rate, rates, procs_per_host: as :func:`~gradsync.lab.cluster.up`.
        argv: arguments of ``gradsync train`` for every rank.
        env: extra environment variables for the ranks.

    Returns:
        The run's exit status (see :func:`run_command`).

    Raises:
        LabError: the lab cannot be created (nothing is left behind).
    """
    with up(hosts, rate, rates, procs_per_host) as lab:  # down on any exit, Ctrl-C included
        return lab_launch(lab, ["train", *argv], env=env, master_port=master_port)
