"""One parameter server: it holds a shard of the parameters and its optimizer state, applies
the workers' gradients and sends parameters back.

One receiver thread per worker blocks on that worker's messages and hands them to the main
loop through a queue, so a silent or lost worker is noticed by its own thread (the engine's
timeout or the dropped connection) without stalling the others. The main loop applies
updates under the chosen consistency:

- ``sync``: wait for every worker's gradient of step t, average them in worker order, update
  once, send the same parameters to all. Equal to SGD on the global batch.
- ``async``: apply each gradient as it arrives (scaled by 1/N, so one round of N pushes
  moves the parameters as far as one sync step) and answer that worker at once.
- ``ssp``: as async, but the answer to a worker's step t is held back until the slowest live
  worker has finished step t - s, so nobody runs more than s steps ahead (Ho et al., 2013).

Checkpoints need no clock of their own: a worker asks (CHECKPOINT, step t) between two steps,
after its own files are on disk, and pushes nothing more until answered. Once every live worker
has asked, no gradient is in flight, so the shard and its optimizer state are a consistent cut
in every mode; the server writes them, then answers SAVED, and the first worker commits when
every server has answered.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import comm
from .protocol import (MAGIC, STATUS_TEXT, TAG, Header, Kind, PSProtocolError, Status, empty_header,
                       validate_push)

log = logging.getLogger(__name__)

HIST_BINS = 16  # staleness histogram: 0..14 and ">= 15"


@dataclass
class ServerStats:
    """What one server measured; travels to the workers as float64 at the end."""

    updates: int = 0
    pushes: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    busy_s: float = 0.0
    max_staleness: int = 0
    max_lead: int = 0
    rejected: int = 0
    staleness_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    dropped: list[int] = field(default_factory=list)  # global ranks of dropped workers

    def to_tensor(self) -> torch.Tensor:
        dropped_mask = sum(1 << w for w in self.dropped if w < 52)  # exact in float64
        head = [self.updates, self.pushes, self.bytes_received, self.bytes_sent, self.busy_s,
                self.max_staleness, self.max_lead, self.rejected, dropped_mask]
        return torch.tensor(head + self.staleness_hist, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ServerStats":
        v = t.tolist()
        mask = int(v[8])
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), v[4], int(v[5]), int(v[6]),
                   int(v[7]), [int(x) for x in v[9:]], [w for w in range(52) if mask >> w & 1])

    @staticmethod
    def size() -> int:
        return 9 + HIST_BINS


@dataclass
class ServerConfig:
    consistency: str = "sync"  # sync | async | ssp
    staleness: int = 0         # the s of ssp
    max_steps: int | None = None


class ParameterServer:
    """Serve shard ``index`` (a (numel,) tensor of initial values) to ``workers``.

    Args:
        shard: initial parameters of this shard.
        index: this server's shard number.
        workers: global ranks of the workers.
        make_optimizer: builds the optimizer for one flat Parameter.
        save: writes ``(step, state_dict())`` into checkpoint ``step`` (None: this run takes
            no checkpoints, and a CHECKPOINT request is rejected).
    """

    def __init__(self, shard: torch.Tensor, index: int, workers: list[int],
                 make_optimizer: Callable, config: ServerConfig,
                 group: comm.Group | None = None,
                 save: Callable[[int, dict[str, Any]], None] | None = None):
        self.param = torch.nn.Parameter(shard.clone())
        self.optimizer = make_optimizer([self.param])
        self.index = index
        self.workers = list(workers)
        self.config = config
        self.group = group
        self.save = save
        self.version = 0
        self.step = 0  # the workers' step when this state was taken: at start, at checkpoints
        self.stats = ServerStats()
        self._inbox: queue.Queue = queue.Queue()
        self._sends: list[comm.Work] = []

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The shard (numel,), its optimizer state, the version and the workers' step; a copy,
        which later updates leave alone."""
        return {"shard": self.param.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "version": self.version, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a checkpoint (same shard layout)."""
        shard = state["shard"]
        if shard.shape != self.param.shape or shard.dtype != self.param.dtype:
            raise ValueError(f"server {self.index}: the checkpoint's shard is "
                             f"{tuple(shard.shape)} {shard.dtype}, this run's "
                             f"{tuple(self.param.shape)} {self.param.dtype}")
        with torch.no_grad():
            self.param.copy_(shard)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.step = int(state["version"]), int(state["step"])

    # --- transport --------------------------------------------------------------------------

    def _reply(self, worker: int, kind: Kind, payload: torch.Tensor | None = None,
               status: int = 0, step: int = 0) -> None:
        numel = 0 if payload is None else payload.numel()
        header = Header(kind, step=step, shard=self.index, numel=numel,
                        version=self.version, sender=self.index, status=status).encode()
        self._sends = [w for w in self._sends if not w.is_completed()]
        # header and payload must stay untouched until sent: the Work keeps them alive.
        for t in (header,) if payload is None else (header, payload):
            work = comm.isend(t, worker, self.group, TAG)
            work.keep = t
            self._sends.append(work)
        self.stats.bytes_sent += numel * self.param.element_size()

    def _receive(self, worker: int) -> None:
        """Receiver thread: validate and enqueue one worker's messages until DONE or loss."""
        numel = self.param.numel()
        header, last_step = empty_header(), self.step - 1
        while True:
            try:
                comm.recv(header, worker, self.group, TAG,
                          what=f"wait for the push of step {last_step + 1}")
                h = Header.decode(header)
                status = validate_push(h, self.index, numel, last_step, self.config.max_steps,
                                       checkpoints=self.save is not None)
                if status == Status.OK and h.kind == Kind.DONE:
                    self._inbox.put(("done", worker, None))
                    return
                if status == Status.OK and h.kind == Kind.CHECKPOINT:
                    self._inbox.put(("checkpoint", worker, h))
                    continue
                if status != Status.OK:
                    # Drain a payload of believable size so the pair stays in step, then stop
                    # listening: this worker's stream is no longer trusted.
                    if h.magic == MAGIC and h.kind == Kind.PUSH and 0 < h.numel <= 4 * numel:
                        comm.recv(torch.empty(h.numel, dtype=self.param.dtype), worker,
                                  self.group, TAG)
                    self._inbox.put(("bad", worker, (h, status)))
                    return
                grad = torch.empty(numel, dtype=self.param.dtype)
                comm.recv(grad, worker, self.group, TAG, what=f"push of step {h.step}")
                last_step = h.step
                self.stats.bytes_received += grad.numel() * grad.element_size()
                self._inbox.put(("push", worker, (h, grad)))
            except comm.CommError as exc:
                self._inbox.put(("lost", worker, str(exc)))
                return

    # --- updates ------------------------------------------------------------------------------

    def _apply(self, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        self.param.grad = grad
        self.optimizer.step()
        self.version += 1
        self.stats.updates += 1
        self.stats.busy_s += time.perf_counter() - start

    def _snapshot(self) -> torch.Tensor:
        return self.param.detach().clone()

    def serve(self) -> ServerStats:
        """Run until every live worker has said DONE; returns this server's statistics.

        Raises:
            PSProtocolError / CommError: in sync mode, a worker was lost or sent a bad message
                (the message names it).
        """
        snapshot = self._snapshot()
        for w in self.workers:
            self._reply(w, Kind.PARAMS, snapshot)
        threads = [threading.Thread(target=self._receive, args=(w,), daemon=True,
                                    name=f"ps-recv-{w}") for w in self.workers]
        for t in threads:
            t.start()
        live, done = set(self.workers), set()
        clock = {w: 0 for w in self.workers}
        pending: dict[int, int] = {}      # worker -> step whose reply is held back (ssp)
        grads: dict[int, torch.Tensor] = {}  # sync: this step's gradients so far
        asked: dict[int, int] = {}        # worker -> step of its checkpoint request
        sync = self.config.consistency == "sync"

        def checkpoint() -> None:
            # Every live worker that has not finished must ask: then nothing is in flight.
            if not asked or not (live - done) <= asked.keys():
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
                self._reply(v, Kind.SAVED, status=status, step=self.step)
            asked.clear()

        def release() -> None:
            if not live:
                return
            slowest = min(clock[w] for w in live)
            for w, step in sorted(pending.items()):
                if slowest >= step + 1 - self.config.staleness:
                    self.stats.max_lead = max(self.stats.max_lead, clock[w] - slowest)
                    self._reply(w, Kind.PARAMS, self._snapshot(), step=step)
                    del pending[w]

        while live - done:
            kind, w, data = self._inbox.get()
            if kind == "push":
                h, grad = data
                self.stats.pushes += 1
                clock[w] = h.step + 1
                if sync:
                    grads[w] = grad
                    if len(grads) == len(live):
                        total = grads[min(grads)].clone()
                        for v in sorted(grads)[1:]:
                            total.add_(grads[v])
                        self._apply(total.div_(len(grads)))
                        snapshot = self._snapshot()
                        for v in sorted(grads):
                            self._reply(v, Kind.PARAMS, snapshot, step=h.step)
                        grads.clear()
                    continue
                staleness = self.version - h.version
                self.stats.max_staleness = max(self.stats.max_staleness, staleness)
                self.stats.staleness_hist[min(staleness, HIST_BINS - 1)] += 1
                # Each push is 1/N of a synchronous step, so that the learning rate that
                # suits sync training (gradient averaged over N workers) suits async too.
                self._apply(grad.div_(len(live)))
                if self.config.consistency == "async":
                    self.stats.max_lead = max(self.stats.max_lead,
                                              clock[w] - min(clock[v] for v in live))
                    self._reply(w, Kind.PARAMS, self._snapshot(), step=h.step)
                else:
                    pending[w] = h.step
                    release()
            elif kind == "checkpoint":
                asked[w] = data.step
                checkpoint()
            elif kind == "done":
                done.add(w)
                clock[w] = 1 << 60  # finished workers hold nobody back
                release()
                checkpoint()
            else:
                if kind == "bad":
                    h, status = data
                    self.stats.rejected += 1
                    self._reply(w, Kind.ERROR, torch.zeros(self.param.numel(),
                                                           dtype=self.param.dtype), status=status)
                    reason = f"rejected a message from rank {w}: {STATUS_TEXT[Status(status)]}"
                else:
                    reason = f"lost worker rank {w} ({data})"
                if sync:
                    self._drain_sends()
                    raise PSProtocolError(f"server {self.index}: {reason}; a sync step cannot "
                                          "complete without it")
                log.warning("server %d: %s; dropping it", self.index, reason)
                live.discard(w)
                pending.pop(w, None)
                grads.pop(w, None)
                asked.pop(w, None)
                self.stats.dropped.append(w)
                release()
                checkpoint()
        for w in sorted(done & live):
            self._reply(w, Kind.STATS, self.stats.to_tensor())
        self._drain_sends()
        return self.stats

    def _drain_sends(self) -> None:
        for work in self._sends:
            try:
                work.wait()
            except comm.CommError as exc:  # a dropped worker cannot take its reply
                log.info("server %d: a reply was not delivered: %s", self.index, exc)
        self._sends.clear()
