"""Liveness and progress of every rank, for naming the culprit when a collective fails or stalls.

Each process runs one daemon thread that publishes a heartbeat to the rendezvous store about
once a second: a fixed layout of integers (time in ms, the number of the last collective it
started and finished on the world group, the training step, the operation code). It costs one
small store write per second and nothing on the collective's path, which only updates a few
attributes of the :class:`~gradsync.comm.group.Group`.

When a collective fails without saying which peer it lost (the engine's own algorithms only
name an address), :func:`diagnose` watches the heartbeats for a little longer than one
period: ranks whose heartbeat stops are named as lost, with what they were last doing. When
a collective has waited longer than ``stall_s``, rank 0 logs which ranks have not arrived,
before the timeout fires.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .ops import OPERATIONS

log = logging.getLogger(__name__)

KEY = "gradsync/hb/{}"


@dataclass
class Beat:
    """One rank's published state."""

    time_ms: int
    started: int    # sequence number of the last collective it entered
    finished: int   # ... and of the last one it completed
    step: int
    op: str

    def encode(self) -> str:
        code = OPERATIONS.index(self.op) if self.op in OPERATIONS else -1
        return f"{self.time_ms} {self.started} {self.finished} {self.step} {code}"

    @classmethod
    def decode(cls, raw: bytes) -> "Beat":
        fields = [int(x) for x in raw.decode("ascii").split()]
        if len(fields) != 5:
            raise ValueError("malformed heartbeat")
        t, started, finished, step, code = fields
        return cls(t, started, finished, step, OPERATIONS[code] if 0 <= code < len(OPERATIONS)
                   else "-")

    def doing(self) -> str:
        where = f"step {self.step}, " if self.step >= 0 else ""
        if self.started > self.finished:
            return f"{where}in {self.op} #{self.started}"
        return f"{where}between collectives (last #{self.finished})"


class Monitor:
    """Publishes this rank's heartbeat and reads the others'."""

    def __init__(self, store, group, interval_s: float = 1.0, stall_s: float = 60.0):
        self.store = store
        self.group = group
        self.interval_s = interval_s
        self.stall_s = stall_s
        self._stop = threading.Event()
        self._reported: int | None = None
        self._thread = threading.Thread(target=self._run, name="gradsync-heartbeat",
                                        daemon=True)

    def start(self) -> "Monitor":
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s)

    def mine(self) -> Beat:
        g = self.group
        return Beat(int(time.time() * 1000), g.seq, g.finished_seq, g.step, g.current_op)

    def _beat(self) -> None:
        self.store.set(KEY.format(self.group.rank), self.mine().encode())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self.group.rank == 0:
                    self._check_stall()
            except Exception as exc:  # noqa: BLE001 - the store is gone: the run is ending
                log.debug("heartbeat stopped: %s", exc)
                return

    def read(self) -> dict[int, Beat | None]:
        """Every rank's last heartbeat (None where none could be read)."""
        beats: dict[int, Beat | None] = {}
        for r in range(self.group.size):
            key = KEY.format(r)
            try:
                beats[r] = Beat.decode(self.store.get(key)) if self.store.check([key]) else None
            except ValueError:
                beats[r] = None
        return beats

    def _check_stall(self) -> None:
        g = self.group
        if g.seq <= g.finished_seq or g.op_started is None or g.seq == self._reported:
            return
        waited = time.monotonic() - g.op_started
        if waited < self.stall_s:
            return
        late = self._not_arrived(self.read(), g.seq)
        if late:
            self._reported = g.seq
            log.warning("%s #%d has waited %.0f s; not arrived: %s", g.current_op, g.seq, waited,
                        "; ".join(f"rank {r} ({b.doing() if b else 'no heartbeat'})"
                                  for r, b in late.items()))

    def _not_arrived(self, beats: dict[int, Beat | None], seq: int) -> dict[int, Beat | None]:
        """The other ranks that have not entered collective ``seq`` (None: no heartbeat)."""
        return {r: b for r, b in sorted(beats.items())
                if r != self.group.rank and (b is None or b.started < seq)}

    def diagnose(self, seq: int) -> str:
        """Name the ranks whose heartbeat has stopped, after watching for 1.5 periods; when
        all still beat, name those that never entered collective ``seq`` (alive but hung).

        Returns:
            e.g. "rank 2 stopped responding (last seen: step 41, in all_reduce #87)", or
            "rank 1 has not arrived (step 7, between collectives (last #1))", or "".
        """
        try:
            before = self.read()
            time.sleep(1.5 * self.interval_s)  # a live rank beats at least once meanwhile
            after = self.read()
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process (or the agent)
            return "rank 0, which serves the rendezvous store, is unreachable"
        lost = [r for r in after if r != self.group.rank and after[r] is not None
                and before[r] is not None and after[r].time_ms == before[r].time_ms]
        if lost:
            return "; ".join(f"rank {r} stopped responding (last seen: {after[r].doing()})"
                             for r in lost)
        return "; ".join(f"rank {r} has not arrived ({b.doing() if b else 'no heartbeat'})"
                         for r, b in self._not_arrived(after, seq).items())
