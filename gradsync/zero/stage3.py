"""Stage 3: parameters sharded at rest, gathered per layer around its forward and backward.

A unit is a module that owns trainable parameters directly (a layer: Linear, LayerNorm,
Embedding, or a custom module's own parameters), and layout.py's ``units`` keep each bucket
inside one unit, so gathering or freeing a unit is gathering or freeing whole buckets. Why
layers and not the two alternatives: a top-level child can be the whole model
(gradsync.models.MLP's only child is its ``net``), so nothing would be freed during
forward; and a bucket of the stage 1-2 layout can span two layers, so it could be freed
only after counting which of its users have run.

At rest each bucket keeps only its ``shard`` (k,); ``flat`` (N * k,) keeps its shape but its
storage holds 0 bytes, and each parameter's ``.data`` is an empty (0,) tensor (an access
at rest fails on the shape instead of reading freed memory). Giving the same storage its
memory back (rather than allocating a new tensor) keeps valid every view of it that
autograd saved in forward, which is why backward can use them once the unit is gathered
again (and the parameters are views into ``flat`` again):

    forward pre-hook    gather the unit (waiting for its prefetch), start the next unit's
    forward hook        free the unit; hook its outputs' gradients
    output grad hook    backward reached the unit: gather it, start the previous unit's
    bucket complete     (sharded.py) reduce-scatter its gradient, free the bucket
    end of forward / backward   wait for every gather, free every bucket

A gathered bucket's memory is borrowed from :class:`~gradsync.zero.buffers.GatherBuffers`,
a few persistent buffers sized to the largest bucket, swapped into the storage and out
again (so the storage, and every view of it, stays the same object), instead of a fresh
block at each gather; before a large unit's forward and backward the free pages of glibc's
heaps go back to the system (buffers.py says why both).

"Next" is registration order (the order of ``module.modules()``), which is forward order
for the usual models; a wrong guess costs a gather that waits, never a wrong value.
Limits: a parameter used outside its owner's forward (a weight tied into another layer,
``F.linear(x, self.embed.weight)`` in a parent) is not gathered there and fails with an
error about its storage.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn

from .. import comm
from .buffers import GatherBuffers, HoleWatch
from .layout import ShardedBucket


def layer_units(module: nn.Module, params: list[nn.Parameter]
                ) -> tuple[list[nn.Module], list[list[int]]]:
    """The modules that own some of ``params`` directly, in registration order, and the
    indices into ``params`` of each one's (a parameter shared by two owners: the first)."""
    index = {id(p): i for i, p in enumerate(params)}
    modules, groups = [], []
    for m in module.modules():
        own = [index.pop(id(p)) for p in m.parameters(recurse=False) if id(p) in index]
        if own:
            modules.append(m)
            groups.append(own)
    return modules, groups


def _tensors(obj):
    """The tensors in a module's output (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


# A unit at least this large (its buckets, gathered) returns glibc's free pages before its
# forward and its backward. The holes that pile up are full-size layers and gradients of
# the large layers; a small layer's blocks are reused by the next small allocations.
TRIM_BYTES = 1 << 20
# Growth of the process (in largest buckets) that the hooks let pass before trimming.
SLACK_BUCKETS = 4


class ParameterGatherer:
    """Gathers and frees the units of stage 3 from module hooks.

    Args:
        modules: the units' modules (:func:`layer_units`), in registration order.
        buckets: all buckets, each with its ``unit`` and its own ``shard``.
        on_backward: called when backward reaches a unit (queues the end-of-backward work).
        prefetch: start the next unit's all-gather while this one computes.
    Attributes:
        gathers: all-gathers started; prefetched: of which started ahead of their unit;
        holes: when the free heap pages went back (``holes.trims``: how often).
    """

    def __init__(self, modules: list[nn.Module], buckets: list[ShardedBucket],
                 group: comm.Group, on_backward, prefetch: bool = True,
                 algorithm: str = "auto"):
        self.group, self.prefetch, self._on_backward = group, prefetch, on_backward
        self.algorithm = algorithm  # the all-gathers' (ShardedDataParallel.shard_algorithm)
        self.units = [[b for b in buckets if b.unit == u] for u in range(len(modules))]
        self._pending: dict[int, comm.Work] = {}
        self.gathers = self.prefetched = 0
        # Three units in flight (see GatherBuffers), each of up to `most` buckets.
        most = max((len(bs) for bs in self.units), default=0)
        self.buffers = GatherBuffers(max((b.flat.numel() * b.flat.element_size()
                                          for b in buckets), default=0), 3 * most)
        self._lent: dict[int, torch.UntypedStorage] = {}  # bucket index -> shell
        # Units whose transients are large enough to leave heap holes worth returning
        # (buffers.release_free_pages); a small layer's (a LayerNorm) are not, and trimming
        # walks every free chunk of every arena.
        self._trim = [sum(b.flat.numel() * b.flat.element_size() for b in bs) >= TRIM_BYTES
                      for bs in self.units]
        self.holes = HoleWatch(SLACK_BUCKETS * self.buffers.nbytes)
        for u, m in enumerate(modules):
            m.register_forward_pre_hook(partial(self._before_forward, u))
            m.register_forward_hook(partial(self._after_forward, u))

    # --- one bucket ------------------------------------------------------------------------

    @staticmethod
    def is_gathered(b: ShardedBucket) -> bool:
        return b.flat.untyped_storage().nbytes() > 0

    def _start(self, b: ShardedBucket) -> bool:
        if b.index in self._pending or self.is_gathered(b):
            return False
        storage, nbytes = b.flat.untyped_storage(), b.flat.numel() * b.flat.element_size()
        shell = self.buffers.lend(storage) if nbytes <= self.buffers.nbytes else None
        if shell is not None:
            self._lent[b.index] = shell
        else:
            storage.resize_(nbytes)
            self.buffers.resized += 1
        for p, offset, shape in zip(b.params, b.offsets, b.shapes):
            p.data = b.flat[offset:offset + shape.numel()].view(shape)
        # Input: this rank's (k,) shard; output: the N (k,) pieces of flat, written in place
        # so that every parameter view (and every view autograd saved) sees the values.
        self._pending[b.index] = comm.all_gather_async(b.pieces(b.flat), b.shard,
                                                       group=self.group,
                                                       algorithm=self.algorithm)
        self.gathers += 1
        return True

    def free(self, b: ShardedBucket) -> None:
        """Drop the bucket's full parameters (after any gather into them finished)."""
        work = self._pending.pop(b.index, None)
        if work is not None:
            work.wait()
        for p in b.params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        shell = self._lent.pop(b.index, None)
        if shell is not None:
            self.buffers.take_back(b.flat.untyped_storage(), shell)
        else:
            b.flat.untyped_storage().resize_(0)

    # --- units -----------------------------------------------------------------------------

    def start(self, u: int, ahead: bool = False) -> None:
        if 0 <= u < len(self.units):
            for b in self.units[u]:
                if self._start(b) and ahead:
                    self.prefetched += 1

    def gather(self, u: int) -> None:
        """Unit ``u``'s full parameters, here and now (collective, in the same order on
        every rank: the hooks run in the same order everywhere)."""
        self.start(u)
        for b in self.units[u]:
            work = self._pending.pop(b.index, None)
            if work is not None:
                work.wait()

    def settle(self) -> None:
        """Wait for every gather in flight and free every bucket: the state at rest."""
        for bs in self.units:
            for b in bs:
                self.free(b)

    @contextlib.contextmanager
    def gathered(self):
        """All parameters whole inside the block (collective), freed after it."""
        try:
            for u in range(len(self.units)):
                self.start(u)
            for u in range(len(self.units)):
                self.gather(u)
            yield
        finally:
            self.settle()

    # --- hooks -----------------------------------------------------------------------------

    def _before_forward(self, u: int, module, args) -> None:
        if u == 0:  # a step starts: growth is counted from here
            self.holes.start()
        elif self._trim[u]:  # the previous layer's holes (gloo's flat output of its gather)
            self.holes.check()
        self.gather(u)
        if self.prefetch:
            self.start(u + 1, ahead=True)

    def _after_forward(self, u: int, module, args, output) -> None:
        for b in self.units[u]:
            self.free(b)
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(partial(self._before_backward, u))

    def _before_backward(self, u: int, grad: torch.Tensor) -> None:
        # The gradient of the unit's output is ready, so its backward comes next: the
        # parameters (and the views of them that autograd saved) must be whole again.
        self._on_backward()
        if self._trim[u]:  # the next layer's (its gradient, comm's staging of its bucket)
            self.holes.check()
        self.gather(u)
        if self.prefetch:
            self.start(u - 1, ahead=True)
