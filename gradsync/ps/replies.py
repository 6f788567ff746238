"""A parameter server's replies in flight: in each worker's push order, retired at its next step.

A worker posts the receive of a partition's reply when it pushes that partition, and gloo
matches receives in the order they were posted: so a server answers each worker's partitions
in the order that worker pushed them, holding a partition summed early until the ones pushed
before it are answered too (:meth:`Replies.ready`).

Gloo marks a send complete only once it has been waited for, so the started sends pile up
unless waited for: when a worker pushes a new step it has received every earlier reply, so
its sends are complete and waiting for them then costs nothing (:meth:`Replies.pushed`).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from .. import comm

log = logging.getLogger(__name__)


class Replies:
    """The replies of one server to ``workers``."""

    def __init__(self, workers: list[int], index: int):
        self.index = index
        self._sends: dict[int, list[comm.Work]] = {w: [] for w in workers}
        self._last_step: dict[int, int] = {}  # per worker, the step of its last push
        self._order: dict[int, deque[int]] = {w: deque() for w in workers}
        self._ready: dict[int, dict[int, Any]] = {w: {} for w in workers}

    def started(self, worker: int, works: list[comm.Work]) -> None:
        """Sends to ``worker`` begun (kept until waited for)."""
        self._sends[worker] += works

    def pushed(self, worker: int, step: int, c: int) -> None:
        """``worker`` pushed partition ``c`` of ``step``: its reply comes after the earlier
        ones."""
        if step != self._last_step.get(worker):
            for work in self._sends[worker]:
                work.wait()  # received by the worker before it pushed again: complete
            self._sends[worker].clear()
            self._last_step[worker] = step
        self._order[worker].append(c)

    def ready(self, worker: int, c: int, item: Any) -> list[tuple[int, Any]]:
        """Partition ``c``'s reply (``item``) is ready; returns the (partition, item) pairs
        now due to ``worker``, in its push order."""
        order, ready = self._order[worker], self._ready[worker]
        ready[c] = item
        due = []
        while order and order[0] in ready:
            first = order.popleft()
            due.append((first, ready.pop(first)))
        return due

    def forget(self, worker: int) -> None:
        """``worker`` was dropped: nothing more is owed to it."""
        self._order[worker].clear()
        self._ready[worker].clear()

    def drain(self) -> None:
        """Wait for every send started; a dropped worker's are logged, not raised."""
        for works in self._sends.values():
            for work in works:
                try:
                    work.wait()
                except comm.CommError as exc:  # a dropped worker cannot take its reply
                    log.info("server %d: a reply was not delivered: %s", self.index, exc)
            works.clear()
