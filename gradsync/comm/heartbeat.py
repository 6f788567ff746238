"""Heartbeats of an elastic job's workers, and the launcher's decision that one is lost.

A worker that dies is seen by the launcher at once (its exit); one that is alive but stuck
(SIGSTOP, a process frozen with the GIL held) is not, and without heartbeats its peers wait
in their collective for the whole timeout. So each worker runs one daemon thread
(:class:`Heartbeat`, started by ``ElasticWorld.from_env``) that writes one key of integers
to the job's store every GRADSYNC_HEARTBEAT_S seconds (default 0.5)::

    elastic/hb/UID = "T STEP"   T: the worker's clock in ms, or -1: it is exiting on purpose
                                STEP: the steps it has completed

The launcher's coordinator (:class:`Watch`) reads them as it polls and notes, on its own
monotonic clock, when each value last changed: a worker's clock is never compared with the
launcher's, so hosts whose clocks disagree would not matter. A member whose heartbeat has
not changed for ``lost_s`` (GRADSYNC_ELASTIC_LOST_S, default 3 s) is declared lost
(:func:`overdue`): the launcher SIGKILLs it and the ordinary loss path follows. A worker that
has not beaten yet (a replacement still importing torch and building its model) has
``startup_s`` (the store's timeout) from its start instead. The coordinator deletes a
member's key once it has exited, so the store does not keep keys of past members.

Not seen: a worker whose main thread is stuck while its process runs (a Python deadlock, an
endless loop) keeps beating; the collective timeout catches it, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

KEY = "elastic/hb/{}"
LEAVING = -1  # T of a worker's last heartbeat when it exits on purpose: judge it no more


def encode(time_ms: int, step: int) -> str:
    return f"{time_ms} {step}"


def decode(raw: bytes) -> tuple[int, int]:
    """(T, STEP) of a heartbeat's value. Raises ValueError when malformed."""
    fields = [int(x) for x in raw.decode("ascii").split()]
    if len(fields) != 2:
        raise ValueError(f"malformed heartbeat {raw!r}")
    return fields[0], fields[1]


class Heartbeat:
    """A worker's side: a daemon thread that writes this member's heartbeat.

    Args:
        store: a client of the job's store.
        uid: this worker's member id.
        interval_s: seconds between heartbeats.
        step: returns the steps this worker has completed (read at each heartbeat).
    """

    def __init__(self, store, uid: int, interval_s: float, step: Callable[[], int],
                 after: Callable[[], None] | None = None):
        self.store, self.key, self.interval_s, self.step = store, KEY.format(uid), interval_s, step
        self.after = after  # run after each beat, in the thread (the worker's loss check)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradsync-elastic-heartbeat",
                                        daemon=True)

    def start(self) -> "Heartbeat":
        self._beat()  # the first one before returning: the launcher's start-up allowance ends
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and say so (idempotent). Call it before the interpreter finalizes: a
        daemon thread inside a store call then would abort the process (comm/group.py)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s)
        try:
            self.store.set(self.key, encode(LEAVING, self.step()))
        except Exception as exc:  # noqa: BLE001 - the store is gone: the launcher has ended
            log.debug("last heartbeat not written: %s", exc)

    def _beat(self) -> None:
        self.store.set(self.key, encode(int(time.time() * 1000), self.step()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self.after is not None:
                    self.after()
            except Exception as exc:  # noqa: BLE001 - the store is gone: the run is ending
                log.debug("heartbeat stopped: %s", exc)
                return


def overdue(now: float, started: dict[int, float], changed: dict[int, float], lost_s: float,
            startup_s: float) -> dict[int, float]:
    """The members to declare lost, each with the seconds it has been silent.

    Args:
        now: the launcher's monotonic clock.
        started: member -> when it was started (the members to judge).
        changed: member -> when its heartbeat last changed (absent: it has not beaten yet).
        lost_s: the longest silence allowed after a heartbeat.
        startup_s: the longest silence allowed from the start to the first heartbeat.
    """
    late = {}
    for uid, start in started.items():
        last = changed.get(uid)
        silent, allowed = (now - start, startup_s) if last is None else (now - last, lost_s)
        if silent > allowed:
            late[uid] = silent
    return late


class Watch:
    """The launcher's side: which members have stopped beating.

    Args:
        store: the job's store.
        lost_s: the longest silence allowed after a heartbeat.
        startup_s: the longest silence allowed from a member's start to its first heartbeat.
        clock: the launcher's monotonic clock (a test's own, to run without waiting).
    """

    def __init__(self, store, lost_s: float, startup_s: float,
                 clock: Callable[[], float] = time.monotonic, key: str = KEY):
        self.store, self.lost_s, self.startup_s, self.clock = store, lost_s, startup_s, clock
        self.key = key  # whose heartbeats: workers (KEY) or the hosts' agents
        self.check_s = min(0.25, lost_s / 10)  # store reads at most this often
        self.started: dict[int, float] = {}
        self._seen: dict[int, tuple[bytes, float]] = {}  # value, when first read
        self._next = 0.0

    def start(self, uid: int) -> None:
        """Member ``uid`` was started: judge it from now on."""
        self.started[uid] = self.clock()

    def forget(self, uid: int) -> None:
        """Member ``uid`` has exited: judge it no more, delete its key."""
        self.started.pop(uid, None)
        self._seen.pop(uid, None)
        if self.store.check([self.key.format(uid)]):
            self.store.delete_key(self.key.format(uid))

    def check(self) -> dict[int, float]:
        """Read the heartbeats (at most every ``check_s``); the members found silent for
        too long, with their silence in seconds. Each is returned once."""
        now = self.clock()
        if now < self._next:
            return {}
        self._next = now + self.check_s
        for uid in list(self.started):
            key = self.key.format(uid)
            if not self.store.check([key]):
                continue
            raw = self.store.get(key)
            try:
                leaving = decode(raw)[0] == LEAVING
            except ValueError:
                leaving = False
            if leaving:  # exiting on purpose: the launcher sees its exit next
                del self.started[uid]
            elif uid not in self._seen or self._seen[uid][0] != raw:
                self._seen[uid] = (raw, now)
        late = overdue(now, self.started, {u: t for u, (_, t) in self._seen.items()},
                       self.lost_s, self.startup_s)
        for uid in late:
            del self.started[uid]
        return late
