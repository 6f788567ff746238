"""The Parameter Server's spans in a ``--timeline`` (:mod:`gradsync.observe.timeline`).

Row ``200 + k`` of a rank's row group is its traffic with server k:

- on a worker ("server k (rank R)"), per step and per partition of shard k: ``push``, from
  gathering the partition's gradient (and compressing it) to handing its header and payload
  to the engine, and ``pull``, from the moment the end of the step turns to this partition's
  reply (replies are taken in push order, one after another) to its parameters being loaded
  into the model. The compute row adds ``wait for communication`` (every pull of the step,
  inside ``optimizer step``). A push goes on over the wire after its span ends: gloo says a
  send is done only once it is waited for, so its arrival cannot be stamped; the pulls hold
  that time.
- on server k ("server k (updates)"), ``update``: one optimizer step of a partition. In sync
  mode one per partition and step (``workers``: the gradients averaged into it); in async
  and ssp one per partition and worker's push (``worker``: its rank).

``args``: ``step`` (numbered as in metrics.jsonl: the protocol counts steps from 0),
``partition`` (its index within the shard), ``bytes`` (a push's as sent, compressed or not; a
pull's and an update's as the partition holds them) and ``server`` (k); a pull adds the
``version`` the server's reply carried.

Recording costs nothing without ``--timeline`` beyond one ``None`` check per partition
(``PSWorker._trace``, ``ParameterServer.trace``); with it, a few microseconds per event, written
once per step (the trainer flushes a worker's; a server flushes its own, see
:class:`ServerTrace`).
"""

from __future__ import annotations

import time

from ..observe.timeline import COMPUTE, SERVERS


class WorkerTrace:
    """A PS worker's pushes and pulls, on ``timeline`` (a gradsync.observe.Timeline).

    Args:
        parts: every partition of every shard, in the worker's numbering g (``Part``s).
        servers: the ranks of the servers, server k holding shard k.
    """

    def __init__(self, timeline, parts: list, servers: list[int]):
        self.timeline = timeline
        self.parts = parts
        for k, rank in enumerate(servers):
            timeline.name_row(SERVERS + k, f"server {k} (rank {rank})")

    def push(self, g: int, start: float, nbytes: int, step: int) -> None:
        """Partition ``g`` of protocol step ``step`` was pushed from ``start`` to now;
        ``nbytes``: its payload as sent."""
        part = self.parts[g]
        self.timeline.record("push", start, time.perf_counter(), tid=SERVERS + part.shard,
                             step=step + 1, partition=part.index, bytes=nbytes,
                             server=part.shard)

    def pull(self, g: int, start: float, step: int, version: int) -> None:
        """Partition ``g``'s reply to the push of ``step`` was waited for from ``start`` and
        is loaded now."""
        part = self.parts[g]
        self.timeline.record("pull", start, time.perf_counter(), tid=SERVERS + part.shard,
                             step=step + 1, partition=part.index, bytes=part.nbytes,
                             server=part.shard, version=version)

    def waited(self, start: float, end: float, step: int) -> None:
        """The step's end waited for every pull from ``start`` to ``end``."""
        self.timeline.record("wait for communication", start, end, tid=COMPUTE, step=step + 1)


class ServerTrace:
    """Server ``index``'s partition updates, on ``timeline``.

    A server has no step loop of its own: it flushes once ``partitions`` updates have been
    recorded since the last flush (once per step in sync mode, once per worker's push of a
    step in async and ssp), and :meth:`flush` before it answers the workers' DONE, so that
    its file is complete before the first worker merges the files.

    Args:
        nbytes: per partition of the shard, its bytes.
    """

    def __init__(self, timeline, index: int, nbytes: list[int]):
        self.timeline, self.index, self.nbytes = timeline, index, nbytes
        self._unflushed = 0
        timeline.name_row(SERVERS + index, f"server {index} (updates)")

    def update(self, c: int, start: float, end: float, step: int, workers: int,
               worker: int | None) -> None:
        """Partition ``c`` was updated from ``start`` to ``end`` with the gradients of
        ``workers`` workers' pushes of protocol step ``step`` (async, ssp: of ``worker``)."""
        args = {} if worker is None else {"worker": worker}
        self.timeline.record("update", start, end, tid=SERVERS + self.index, step=step + 1,
                             partition=c, bytes=self.nbytes[c], server=self.index,
                             workers=workers, **args)
        self._unflushed += 1
        if self._unflushed >= len(self.nbytes):
            self.flush()

    def flush(self) -> None:
        self.timeline.flush()
        self._unflushed = 0
