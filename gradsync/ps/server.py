"""One parameter server: it holds a shard of the parameters and its optimizer state, applies
the workers' gradients and sends parameters back.

One receiver thread per worker blocks on that worker's messages and hands them to the main
loop through a queue, so a silent or lost worker is noticed by its own thread (the engine's
timeout or the dropped connection) without stalling the others. The main loop takes one event
at a time (a push, a checkpoint request, DONE, a rejected message, a lost worker) and hands it
to its handler; the chosen consistency (``consistency.py``) decides when a push is applied and
answered:

- ``sync``: average every worker's gradient of step t, update once, answer all. Equal to SGD
  on the global batch. The shard is cut into partitions (``sharding.py``), each with its own
  optimizer over its slice (the optimizers are elementwise, so this is the same update): a
  partition is summed, updated and answered as soon as every worker's piece of it is in,
  while the next partitions are still arriving (BytePS's pipelining).
- ``async``: apply each worker's gradient of the shard as it arrives (scaled by 1/N) and
  answer at once.
- ``ssp``: as async, but hold the answer to step t until the slowest live worker has finished
  step t - s (Ho et al., 2013).

Checkpoints need no clock of their own: a worker asks (CHECKPOINT, step t) between two steps,
after its own files are on disk, and pushes nothing more until answered. Once every live worker
has asked, no gradient is in flight, so the shard and its optimizer state are a consistent cut
in every mode; the server writes them, then answers SAVED, and the first worker commits when
every server has answered.

A receiver thread trusts nothing its worker sends (``receive.py``): a malformed message, or a
gradient with NaN or Inf, is answered with ERROR and ends that thread. Under sync the run then
stops with an error that names the sender, the step and the fault; under async and ssp the
sender is dropped like a lost worker and the others train on. No message kills the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import torch

from .. import comm
from .compression import PushRules
from .config import ServerConfig  # defined there; importable from here as before
from .consistency import MODES
from .inbox import feed
from .protocol import Header, Kind, PSProtocolError, ServerStats, Status, send_message
from .receive import Message, Receiver
from .replies import Replies
from .server_state import load_shard_state, shard_state
from .trace import ServerTrace

log = logging.getLogger(__name__)

NONFINITE_HINT = ("; lower the learning rate, or pass nonfinite='skip' (--on-nonfinite skip) to "
                  "skip such updates")


class ParameterServer:
    """Serve shard ``index`` to ``workers``.

    Args:
        shard: initial parameters of this shard: a (numel,) tensor (one partition), or one
            tensor per partition (any dtypes).
        index: this server's shard number.
        workers: ranks of the workers in ``group``.
        make_optimizer: builds the optimizer for one flat Parameter.
        save: writes ``(step, state_dict())`` into checkpoint ``step`` (None: this run takes
            no checkpoints, and a CHECKPOINT request is rejected).
        reply_group: the group replies go out on (same ranks as ``group``, its own
            connections); None: ``group``.
    """

    def __init__(self, shard: torch.Tensor | list[torch.Tensor], index: int, workers: list[int],
                 make_optimizer: Callable, config: ServerConfig,
                 group: comm.Group | None = None,
                 save: Callable[[int, dict[str, Any]], None] | None = None,
                 reply_group: comm.Group | None = None):
        parts = [shard] if isinstance(shard, torch.Tensor) else list(shard)
        # One flat Parameter and one optimizer per partition: a partition is updated alone.
        self.params = [torch.nn.Parameter(t.detach().clone().reshape(-1)) for t in parts]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self.versions = [0] * len(self.params)  # updates of each partition
        self.index = index
        self.workers = list(workers)
        self.config = config
        self.group = group
        self.reply_group = reply_group or group
        self.save = save
        self.step = 0  # the workers' step when this state was taken: at start, at checkpoints
        self.stats = ServerStats()
        self._inbox: queue.Queue = queue.Queue()
        self._closed = threading.Event()  # serve() has returned or raised
        self.replies = Replies(self.workers, index)  # in each worker's push order
        self._receivers: list[Receiver] = []
        self.live, self.done = set(self.workers), set()  # done: workers that said DONE
        self._asked: dict[int, int] = {}  # worker -> step of its checkpoint request
        self.mode = MODES[config.consistency](self)
        self.rules = [PushRules.of(config.compression, p.dtype, p.numel(), len(self.workers))
                      for p in self.params]
        self.trace: ServerTrace | None = None  # --timeline: its updates (``trace.py``)

    @property
    def version(self) -> int:
        """The shard's version: updates every partition has had."""
        return min(self.versions, default=0)

    @property
    def partitions(self) -> int:
        return len(self.params)

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The shard, its optimizer states, versions and the workers' step: a copy, which
        later updates leave alone (``server_state.py``)."""
        return shard_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a checkpoint (same shard layout and partitions)."""
        load_shard_state(self, state)

    # --- what the consistency modes use -------------------------------------------------------

    def reply(self, worker: int, kind: Kind, payload: torch.Tensor | None = None,
              status: int = 0, step: int = 0, partition: int = 0) -> None:
        """Start sending ``worker`` a reply; ``payload`` must not change afterwards."""
        numel = 0 if payload is None else payload.numel()
        version = self.versions[partition] if self.versions else 0
        header = Header(kind, step=step, shard=self.index, numel=numel, version=version,
                        sender=self.index, status=status, partition=partition)
        try:
            works = send_message(header, payload, worker, self.reply_group)
        except comm.CommError as exc:
            # The worker is gone: its receiver thread reports the loss as an event of its own,
            # which drops it or stops the run (``_on_lost``); the reply is owed to no one.
            log.info("server %d: a reply to rank %d was not sent: %s", self.index, worker, exc)
            return
        self.replies.started(worker, works)
        self.stats.bytes_sent += 0 if payload is None else numel * payload.element_size()

    def answer(self, worker: int, c: int, payload: torch.Tensor, step: int) -> None:
        """Send ``worker`` partition ``c``'s parameters after its push of ``step``, once the
        partitions it pushed before ``c`` have been answered."""
        for first, (values, at) in self.replies.ready(worker, c, (payload, step)):
            self.reply(worker, Kind.PARAMS, values, step=at, partition=first)

    def apply(self, c: int, grad: torch.Tensor, step: int = 0, workers: int = 1,
              worker: int | None = None) -> None:
        """One optimizer step of partition ``c`` with ``grad`` (numel,): the pushes of
        ``step`` by ``workers`` workers averaged (async, ssp: ``worker``'s), for the trace."""
        start = time.perf_counter()
        self.params[c].grad = grad
        self.optimizers[c].step()
        self.versions[c] += 1
        end = time.perf_counter()
        self.stats.busy_s += end - start
        if self.trace is not None:
            self.trace.update(c, start, end, step, workers, worker)

    def snapshot(self, c: int) -> torch.Tensor:
        """A copy of partition ``c`` (numel,) to send, which later updates leave alone."""
        return self.params[c].detach().clone()

    # --- the receiver threads -----------------------------------------------------------------

    def _receive(self, worker: int) -> None:
        """Receiver thread: enqueue one worker's messages until DONE, a bad message or loss
        (``inbox.py``).

        A rejected message ends the thread: that worker's stream is no longer trusted.
        """
        rx = Receiver(worker, self.group, self.index,
                      [(p.numel(), p.dtype) for p in self.params], self.config.max_steps,
                      checkpoints=self.save is not None, rules=self.rules, step=self.step)
        self._receivers.append(rx)  # its receives posted early live as long as the server
        feed(self, rx, worker, self._inbox.put, self._closed)

    # --- the main loop: one handler per event -------------------------------------------------

    def serve(self) -> ServerStats:
        """Run until every live worker has said DONE; returns this server's statistics.

        Raises:
            PSProtocolError / CommError: in sync mode, a worker was lost or sent a bad message
                (the message names it).
        """
        try:
            return self._serve()
        finally:
            self._closed.set()

    def _serve(self) -> ServerStats:
        snapshots = [self.snapshot(c) for c in range(self.partitions)]
        for w in self.workers:
            for c, values in enumerate(snapshots):
                self.reply(w, Kind.PARAMS, values, partition=c)
        for w in self.workers:
            threading.Thread(target=self._receive, args=(w,), daemon=True,
                             name=f"ps-recv-{w}").start()
        handlers = {"push": self._on_push, "checkpoint": self._on_checkpoint,
                    "done": self._on_done, "bad": self._on_bad, "lost": self._on_lost}
        while self.live - self.done:
            event, worker, data = self._inbox.get()
            handlers[event](worker, data)
        if self.trace is not None:  # complete before the first worker merges the files
            self.trace.flush()
        for w in sorted(self.done & self.live):
            self.reply(w, Kind.STATS, self.stats.to_tensor())
        self.replies.drain()
        return self.stats

    def _on_push(self, worker: int, msg: Message) -> None:
        grad = msg.payload if msg.status == Status.OK else None  # None: skip it
        self.stats.pushes += 1
        if grad is None:
            log.warning("server %d: %s; %s (nonfinite='skip')", self.index, msg.text,
                        self.mode.skip_text)
        self.replies.pushed(worker, msg.header.step, msg.header.partition)
        self.mode.push(worker, msg.header.step, msg.header.version, msg.header.partition, grad)

    def _on_checkpoint(self, worker: int, header: Header) -> None:
        self._asked[worker] = header.step
        self._checkpoint()

    def _on_done(self, worker: int, _: None) -> None:
        self.done.add(worker)
        self.mode.finished(worker)
        self._checkpoint()

    def _on_bad(self, worker: int, msg: Message) -> None:
        # The zeros fill (part of) the parameters receive the worker posted with its push:
        # no longer than its smallest partition.
        self.stats.rejected += 1
        least = min(p.numel() * p.element_size() for p in self.params)
        self.reply(worker, Kind.ERROR, torch.zeros(least, dtype=torch.uint8), status=msg.status)
        nonfinite = msg.status == Status.NON_FINITE  # a sync run's fault: stops it, elastic too
        self._drop(worker, msg.text, NONFINITE_HINT if nonfinite else "", elastic=not nonfinite)

    def _on_lost(self, worker: int, text: str) -> None:
        self._drop(worker, f"lost worker rank {worker} ({text})")

    def _drop(self, worker: int, reason: str, hint: str = "", elastic: bool = True) -> None:
        """Go on without ``worker`` (async, ssp, sync when elastic and ``elastic``), or stop
        the run naming it (sync; or fewer than ``min_workers`` left when elastic)."""
        if not (self.mode.drops or (self.config.elastic and elastic)):
            self.replies.drain()
            raise PSProtocolError(f"server {self.index}: {reason}; a sync step cannot "
                                  f"complete without rank {worker}{hint}")
        left = len(self.live - {worker})
        if self.config.elastic and left < self.config.min_workers:
            self.replies.drain()
            raise PSProtocolError(f"server {self.index}: {reason}; {left} workers left, fewer "
                                  f"than --min-workers {self.config.min_workers}{hint}")
        # one line per drop: the step this shard was at, the rank, who is left
        log.warning("server %d: %s; dropping rank %d at step %d, the others train on (%d "
                    "workers)%s", self.index, reason, worker, self.mode.step_of(worker), left,
                    hint)
        self.live.discard(worker)
        self._asked.pop(worker, None)
        self.replies.forget(worker)
        self.stats.dropped.append(worker)
        self.mode.dropped(worker)
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Save once every live worker that has not finished has asked: then nothing is in
        flight."""
        asked = self._asked
        if not asked or not (self.live - self.done) <= asked.keys():
            return
        steps = sorted(set(asked.values()))
        if len(steps) > 1:
            raise PSProtocolError(f"server {self.index}: workers asked for checkpoints of "
                                  f"different steps {asked}; is --checkpoint-every the "
                                  "same everywhere?")
        self.step = steps[0]
        self.save(self.step, self.state_dict())
        status = Status.INCOMPLETE if self.stats.dropped else Status.OK
        for v in sorted(asked):
            self.reply(v, Kind.SAVED, status=status, step=self.step)
        asked.clear()
