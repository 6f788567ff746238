"""When a parameter server applies the pushed gradients, and when it answers a push.

- ``sync`` (:class:`Sync`): wait for every worker's gradient of step t, average them in worker
  order, update once, send the same parameters to all. Equal to SGD on the global batch.
- ``async`` (:class:`Async`): apply each gradient as it arrives (scaled by 1/N, so one round of
  N pushes moves the parameters as far as one sync step) and answer that worker at once.
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

from .protocol import HIST_BINS, Kind

FINISHED = 1 << 60  # the clock of a worker that said DONE: finished workers hold nobody back


class Consistency:
    """What the modes share: the events they take. ``server``: the ParameterServer served."""

    skip_text = ""
    """What a non-finite gradient left out (nonfinite="skip") means in this mode, for the log."""
    drops = True
    """Whether the others train on without a lost or rejected worker (else the run stops)."""

    def __init__(self, server):
        self.server = server

    def push(self, worker: int, step: int, version: int, grad: torch.Tensor | None) -> None:
        """``worker``'s gradient of ``step``, computed on ``version`` of the shard; None: a
        non-finite gradient left out under nonfinite="skip"."""
        raise NotImplementedError

    def finished(self, worker: int) -> None:
        """``worker`` said DONE: it pushes nothing more."""

    def dropped(self, worker: int) -> None:
        """``worker`` was lost or rejected; it has left ``server.live`` already."""


class Sync(Consistency):
    skip_text = "the step's update of this shard is skipped for every worker"
    drops = False  # a sync step cannot complete without every worker

    def __init__(self, server):
        super().__init__(server)
        self.grads: dict[int, torch.Tensor | None] = {}  # this step's gradients so far

    def push(self, worker, step, version, grad):
        self.grads[worker] = grad
        if len(self.grads) == len(self.server.live):
            self._update(step)

    def _update(self, step: int) -> None:
        """Every live worker's gradient of ``step`` is in: average them in worker order,
        update once, send the same parameters to all. A None (a non-finite gradient under
        nonfinite="skip") skips this shard's update of the step for every worker alike."""
        server, grads = self.server, self.grads
        if any(g is None for g in grads.values()):
            server.stats.skipped += 1
        else:
            total = grads[min(grads)].clone()
            for v in sorted(grads)[1:]:
                total.add_(grads[v])
            server.apply(total.div_(len(grads)))
        snapshot = server.snapshot()
        for v in sorted(grads):
            server.reply(v, Kind.PARAMS, snapshot, step=step)
        grads.clear()

    def dropped(self, worker):
        self.grads.pop(worker, None)


class Async(Consistency):
    skip_text = "this push updates nothing"

    def __init__(self, server):
        super().__init__(server)
        self.clock = {w: 0 for w in server.workers}  # steps each worker has pushed

    def push(self, worker, step, version, grad):
        server, stats = self.server, self.server.stats
        self.clock[worker] = step + 1
        if grad is None:
            stats.skipped += 1
        else:
            staleness = server.version - version  # >= 0: the receiver checked it
            stats.max_staleness = max(stats.max_staleness, staleness)
            stats.staleness_hist[min(staleness, HIST_BINS - 1)] += 1
            # Each push is 1/N of a synchronous step, so that the learning rate that suits
            # sync training (gradient averaged over N workers) suits async too.
            server.apply(grad.div_(len(server.live)))
        self.answer(worker, step)

    def answer(self, worker: int, step: int) -> None:
        """Send ``worker`` the parameters after its push of ``step``: at once."""
        server = self.server
        lead = self.clock[worker] - min(self.clock[v] for v in server.live)
        server.stats.max_lead = max(server.stats.max_lead, lead)
        server.reply(worker, Kind.PARAMS, server.snapshot(), step=step)

    def finished(self, worker):
        self.clock[worker] = FINISHED


class SSP(Async):
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
                server.reply(w, Kind.PARAMS, server.snapshot(), step=step)
                del self.pending[w]

    def finished(self, worker):
        super().finished(worker)
        self.release()

    def dropped(self, worker):
        self.pending.pop(worker, None)
        self.release()


MODES = {"sync": Sync, "async": Async, "ssp": SSP}
