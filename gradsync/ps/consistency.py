"""When a parameter server applies the pushed gradients, and when it answers a push.

- ``sync`` (:class:`Sync`): per partition of the shard, wait for every worker's gradient of
  step t, average them in worker order, update once, send the same parameters to all. Equal
  to SGD on the global batch; a partition is answered while later ones still arrive. With
  ``elastic``, a lost worker is dropped and the step in flight completes without it.
- ``async`` (:class:`Async`): apply each worker's gradient of the shard (all its partitions) as
  it arrives (scaled by 1/N, so one round of N pushes moves the parameters as far as one sync
  step) and answer that worker at once.
- ``ssp`` (:class:`SSP`): as async, but the answer to a worker's step t is held back until the
  slowest live worker has finished step t - s, so nobody runs more than s steps ahead (Ho et
  al., 2013).

A mode sees three events from the server's main loop: a push, a worker that finished (DONE),
and a worker that was dropped. The server keeps the parameters, the optimizer, the transport
and the set of live workers; a mode updates through ``server.apply`` and answers through
``server.reply``.
"""

from __future__ import annotations

import torch

from .protocol import HIST_BINS

FINISHED = 1 << 60  # the clock of a worker that said DONE: finished workers hold nobody back


class Consistency:
    """What the modes share: the events they take. ``server``: the ParameterServer served."""

    skip_text = ""
    """What a non-finite gradient left out (nonfinite="skip") means in this mode, for the log."""
    drops = True
    """Whether the others train on without a lost or rejected worker (else the run stops)."""
    bounded = False
    """Whether ``staleness`` (``--staleness``) bounds how far a worker runs ahead."""

    def __init__(self, server):
        self.server = server

    def push(self, worker: int, step: int, version: int, c: int,
             grad: torch.Tensor | None) -> None:
        """``worker``'s gradient of partition ``c`` of ``step``, computed on ``version`` of the
        shard; None: a non-finite gradient left out under nonfinite="skip"."""
        raise NotImplementedError

    def finished(self, worker: int) -> None:
        """``worker`` said DONE: it pushes nothing more."""

    def dropped(self, worker: int) -> None:
        """``worker`` was lost or rejected; it has left ``server.live`` already."""

    def step_of(self, worker: int) -> int:
        """The step ``worker`` is in, for the log line of its drop."""
        raise NotImplementedError


class Sync(Consistency):
    skip_text = "the step's update of this partition is skipped for every worker"
    drops = False  # a sync step cannot complete without every worker (unless elastic)

    def __init__(self, server):
        super().__init__(server)
        # per partition, this step's gradients so far
        self.grads: list[dict[int, torch.Tensor | None]] = [{} for _ in range(server.partitions)]
        self.finished_parts, self.skipped = 0, False  # of this step
        self.step = server.step  # the step being gathered

    def push(self, worker, step, version, c, grad):
        self.step = step  # no push of step t + 1 before every partition of t is answered
        self.grads[c][worker] = grad
        if len(self.grads[c]) == len(self.server.live):
            self._update(c, step)

    def _update(self, c: int, step: int) -> None:
        """Every live worker's gradient of partition ``c`` of ``step`` is in: average them in
        worker order, update the partition once, send the same parameters to all. A None (a
        non-finite gradient under nonfinite="skip") skips this partition's update of the step
        for every worker alike."""
        server, grads = self.server, self.grads[c]
        if any(g is None for g in grads.values()):
            self.skipped = True
        else:
            total = grads[min(grads)].clone()
            for v in sorted(grads)[1:]:
                total.add_(grads[v])
            server.apply(c, total.div_(len(grads)), step, workers=len(grads))
        snapshot = server.snapshot(c)
        for v in sorted(grads):
            server.answer(v, c, snapshot, step)
        grads.clear()
        self.finished_parts += 1
        if self.finished_parts == server.partitions:  # the step is done on this shard
            if self.skipped:
                server.stats.skipped += 1
            else:
                server.stats.updates += 1
            self.finished_parts, self.skipped = 0, False
            self.step = step + 1

    def dropped(self, worker):
        """Elastic: the step in flight completes without ``worker``. A partition it had
        pushed and that was already updated keeps its gradient; the others average the live
        workers' (each server decides for its own partitions: docs/reliability.md)."""
        for c, grads in enumerate(self.grads):
            grads.pop(worker, None)
            if grads and len(grads) == len(self.server.live):  # waited only for it
                self._update(c, self.step)

    def step_of(self, worker):
        return self.step


class Async(Consistency):
    """Per shard: a worker's push of a step is applied once all its partitions are in."""

    skip_text = "this push updates nothing"

    def __init__(self, server):
        super().__init__(server)
        self.clock = {w: 0 for w in server.workers}  # steps each worker has pushed
        # per worker, its partitions of the step so far: c -> (version, gradient or None)
        self.parts: dict[int, dict[int, tuple[int, torch.Tensor | None]]] = \
            {w: {} for w in server.workers}

    def push(self, worker, step, version, c, grad):
        server, stats, parts = self.server, self.server.stats, self.parts[worker]
        # (a dense push's gradient is a view of its receive buffer, fresh for each message)
        parts[c] = (version, grad)
        if len(parts) < server.partitions:
            return
        self.clock[worker] = step + 1
        if any(g is None for _, g in parts.values()):
            stats.skipped += 1
        else:
            staleness = server.version - min(v for v, _ in parts.values())  # >= 0: checked
            stats.max_staleness = max(stats.max_staleness, staleness)
            stats.staleness_hist[min(staleness, HIST_BINS - 1)] += 1
            # Each push is 1/N of a synchronous step, so that the learning rate that suits
            # sync training (gradient averaged over N workers) suits async too.
            for p, (_, g) in sorted(parts.items()):
                server.apply(p, g.div_(len(server.live)), step, worker=worker)
            stats.updates += 1
        parts.clear()
        self.answer(worker, step)

    def reply_all(self, worker: int, step: int) -> None:
        for c in range(self.server.partitions):
            self.server.answer(worker, c, self.server.snapshot(c), step)

    def answer(self, worker: int, step: int) -> None:
        """Send ``worker`` the parameters after its push of ``step``: at once."""
        server = self.server
        lead = self.clock[worker] - min(self.clock[v] for v in server.live)
        server.stats.max_lead = max(server.stats.max_lead, lead)
        self.reply_all(worker, step)

    def finished(self, worker):
        self.clock[worker] = FINISHED

    def dropped(self, worker):
        self.parts.pop(worker, None)

    def step_of(self, worker):
        return self.clock[worker]


class SSP(Async):
    bounded = True

    def __init__(self, server):
        super().__init__(server)
        self.staleness = server.config.staleness
        self.pending: dict[int, int] = {}  # worker -> step whose answer is held back

    def answer(self, worker, step):
        """Hold the answer to ``worker``'s push of ``step`` until the slowest live worker is
        within ``staleness`` steps of it."""
        self.pending[worker] = step
        self.release()

    def release(self) -> None:
        server = self.server
        if not server.live:
            return
        slowest = min(self.clock[w] for w in server.live)
        for w, step in sorted(self.pending.items()):
            if slowest >= step + 1 - self.staleness:
                server.stats.max_lead = max(server.stats.max_lead, self.clock[w] - slowest)
                self.reply_all(w, step)
                del self.pending[w]

    def finished(self, worker):
        super().finished(worker)
        self.release()

    def dropped(self, worker):
        super().dropped(worker)
        self.pending.pop(worker, None)
        self.release()


# The one table of consistency modes (--consistency): a new mode is one class beside these
# (or a file of its own) plus one line here; the config's choices and the server's
# validation derive from it.
MODES = {"sync": Sync, "async": Async, "ssp": SSP}
