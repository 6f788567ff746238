"""Stages 1-2: the parameters' all-gather after ``step()``, waited for layer by layer in the
next forward.

After the shard optimizer steps its (<= k,) pieces, every rank needs the whole (N * k,)
``flat`` of every bucket again: one all-gather per bucket. Waited for at once, that is
pure communication time on every step (in the 3-host lab at 1 Gbit, an 8.4 MB all-gather
takes about 53 ms, half of DataParallel's step). Instead :meth:`RegatherAfterStep.start`
launches them in forward order (buckets are filled in reverse registration order, so the
bucket of the first layers is launched first), and a forward pre-hook on each module that
owns parameters waits only for the buckets holding its own ones: the first layer computes
while the later layers' parameters are still on the wire, as FSDP's forward prefetch does
for its units (and stage3.py's ParameterGatherer for stage 3's layers).

Whoever reads parameters before the next forward must wait first: :meth:`wait` (public
as ``ShardedDataParallel.wait_for_parameters()``). The module's ``state_dict()`` and
``load_state_dict()`` (so the trainer's checkpoints), the wrapper's checkpoints, the next
``step()`` and the end of the wrapper's forward (layers that did not run) do so
themselves. What does not: a parameter read in a forward other than its owner's (a
parent reading ``self.child.weight`` before calling ``child``) or outside any forward
(``model.parameters()`` inspected by hand); ``prefetch=False`` waits in ``step()``.
``zero_grad()`` does not wait: it touches gradients only, and waiting there (the trainer
calls it before the forward) would undo the overlap.
"""

from __future__ import annotations

import time
from functools import partial

from torch import nn

from .. import comm
from .layout import ShardedBucket


class RegatherAfterStep:
    """The all-gathers of every bucket's pieces after a shard step, waited for lazily.

    Args:
        module: the wrapped model; its modules that own parameters directly get a forward
            pre-hook (a parameter owned by two modules, tied weights: by both).
        buckets: the stage 1-2 buckets (``flat`` holds the parameters).
        algorithm: the all-gathers' (ShardedDataParallel's ``gather_algorithm``).
        overlap: False: :meth:`start` waits for them before returning.
    Attributes:
        wait_s: seconds spent waiting for the gathers (a summary's "waiting on
            communication").
    """

    def __init__(self, module: nn.Module, buckets: list[ShardedBucket], group: comm.Group,
                 algorithm: str = "auto", overlap: bool = True):
        self.buckets, self.group, self.algorithm = buckets, group, algorithm
        self.overlap = overlap
        self.wait_s = 0.0
        self._pending: dict[int, comm.Work] = {}
        where = {id(p): b.index for b in buckets for p in b.params}
        if overlap:
            for m in module.modules():
                mine = sorted({where[id(p)] for p in m.parameters(recurse=False)
                               if id(p) in where})
                if mine:
                    m.register_forward_pre_hook(partial(self._before_forward, tuple(mine)))
        # (lambdas: the hooks' arguments differ, and neither needs them)
        module.register_state_dict_pre_hook(lambda *args: self.wait())
        module.register_load_state_dict_pre_hook(lambda *args: self.wait())

    @property
    def pending(self) -> int:
        """All-gathers launched and not yet waited for."""
        return len(self._pending)

    def start(self) -> None:
        """Launch every bucket's all-gather (collective; the same order on every rank)."""
        self.wait()
        for b in reversed(self.buckets):  # forward order: the first layers' bucket first
            # (k,) input: this rank's piece with its padding, which is also the output
            # list's entry ``rank``: every engine and algorithm stages the input into a
            # (N * k,) buffer before writing the outputs, so the aliasing is safe and saves
            # a copy of the piece.
            pieces = b.pieces(b.flat)
            self._pending[b.index] = comm.all_gather_async(
                pieces, pieces[b.rank], group=self.group, algorithm=self.algorithm)
        if not self.overlap:
            self.wait()

    def wait(self, indices=None) -> None:
        """Wait for the gathers of the buckets ``indices`` (default: all) to finish."""
        if not self._pending:
            return
        start = time.perf_counter()
        try:
            for i in (list(self._pending) if indices is None else indices):
                work = self._pending.pop(i, None)
                if work is not None:
                    work.wait()
        finally:
            self.wait_s += time.perf_counter() - start

    def _before_forward(self, indices: tuple[int, ...], module, args) -> None:
        self.wait(indices)
