"""ShardedDataParallel: the module wrapper, its backward hooks and its gradient collectives.

During backward a hook on each parameter moves its gradient, divided by N, into its
bucket's ``grad_flat`` (the layout of layout.py); once a bucket is complete its
reduce-scatter starts while autograd goes on with earlier layers, in bucket index order on
every rank (each rank receives the sum of its own (k,) piece: DataParallel's bytes on a
ring, half an all-reduce):

    stage 1   reduce_scatter(grad_flat) -> its own piece of grad_flat   grad_flat kept;
              param.grad is its slot (averaged on this rank's piece, the local gradient / N
              elsewhere)
    stage 2   reduce_scatter(grad_flat) -> (k,)  grad_flat dropped at launch; param.grad None

A callback at the end of backward waits for them and points each bucket's ``piece.grad``
at this rank's averaged piece (stage 1: a view into grad_flat; stages 2-3: the (k,) result).
Stage 3 reduces as stage 2 does and also frees each bucket's parameters once its gradient
is complete; the gathering around forward and backward is stage3.py's. Stages 1-2's
all-gather after the step is regather.py's.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch
from torch import nn

from .. import comm
from ..allreduce.bucket_reduce import attach_topology
from . import checkpoint
from .buffers import FillBuffers
from .layout import ShardedBucket, own_pieces, shard_parameters
from .optimizer import ShardedOptimizer
from .regather import RegatherAfterStep
from .stage3 import ParameterGatherer, layer_units

STAGES = (1, 2, 3)
# Reduce-scatters left in flight during backward (each holds its bucket's staging copy);
# more waits for none sooner, fewer could stall backward on the network.
IN_FLIGHT = 2


class ShardedDataParallel(nn.Module):
    """Data parallelism with the optimizer state (stage 1), also the gradients (stage 2) and
    also the parameters (stage 3) sharded across the ranks of ``group`` (ZeRO, Rajbhandari
    et al. 2020).

    Args:
        module: the model; every rank builds the same architecture (rank 0's values win).
        optimizer_class: e.g. ``torch.optim.Adam``; built on this rank's pieces only, with
            ``**defaults`` (torch's ``ZeroRedundancyOptimizer`` signature). Step it through
            :attr:`optimizer`, whose ``step()`` launches the parameters' all-gather.
        stage: 1, 2 or 3.
        group: the ranks to shard over (default: all).
        bucket_cap_mb: size of a bucket in MiB: the unit of overlap with backward.
        algorithm: ``native`` keeps every collective on the engine; otherwise the
            reduce-scatters run shared memory on one host and gradsync's ring across hosts
            (gloo's own reduce-scatter moves an all-reduce's bytes), the all-gathers
            ``auto`` (shared memory on one host, else the engine's ring).
        topology: as DataParallel's (what ``auto`` takes into account).
        broadcast_buffers: copy rank 0's buffers before each forward that syncs.
        prefetch: stage 3: start the next layer's all-gather while this one computes;
            stages 1-2: the all-gather after ``step()`` runs while the next forward
            computes, each layer waiting for its own parameters (False: ``step()`` waits;
            see :meth:`wait_for_parameters`).
    Raises:
        ValueError: unknown stage or optimizer arguments; a rank whose pieces are all
            padding (a model with fewer elements than ranks).
        CollectiveMismatchError: ranks hold different parameters.
    """

    def __init__(self, module: nn.Module, optimizer_class=torch.optim.Adam, *, stage: int = 1,
                 group: comm.Group | None = None, bucket_cap_mb: float = 25.0,
                 algorithm: str = "auto", topology: "comm.Topology | str | None" = "probe",
                 broadcast_buffers: bool = True, prefetch: bool = True, **defaults):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        comm.check_algorithm(algorithm)
        if group is None:
            group = comm.world() if comm.is_initialized() else comm.init_process_group()
        self.module, self.group, self.stage = module, group, stage
        self.broadcast_buffers = broadcast_buffers
        attach_topology(group, topology)
        # "native" keeps every collective on the engine (no shared-memory segment); "auto"
        # is shared memory on one host, else gradsync's ring for the reduce-scatters and the
        # engine's all-gather (comm/algorithms/collective_registry.py).
        self.shard_algorithm = "native" if algorithm == "native" else "auto"
        comm.verify_tensors(group, "parameters and buffers",
                            [(n, p.detach()) for n, p in module.named_parameters()]
                            + list(module.named_buffers()))
        params = [p for p in module.parameters() if p.requires_grad]
        # Names of the sharded parameters, for checkpoints (by id: stage 3 swaps .data).
        self.param_names = {id(p): name for name, p in module.named_parameters()
                            if p.requires_grad}
        modules, units = layer_units(module, params) if stage == 3 else ([], None)
        self._buckets: list[ShardedBucket] = shard_parameters(
            params, int(bucket_cap_mb * (1 << 20)), group.size, group.rank, units)
        with torch.no_grad():
            for b in self._buckets:  # rank 0's values, one broadcast per bucket
                comm.broadcast(b.flat, src=0, group=group)
            for t in module.buffers():
                comm.broadcast(t, src=0, group=group)
        if stage == 1:  # whole gradients kept (8 + 8/N bytes/param with Adam in float32)
            for b in self._buckets:
                b.grad_flat = torch.zeros_like(b.flat)
        self._fill = FillBuffers(self._buckets)  # stages 2-3: grad_flat while it fills
        for b in self._buckets:
            for i, p in enumerate(b.params):
                p.register_post_accumulate_grad_hook(partial(self._on_grad, b, i))
        self._require_sync = True
        self.launched_during_backward = 0
        self.comm_wait_s = 0.0  # backward's end waiting on its collectives, as DataParallel's
        self._reset_step()
        self.gatherer: ParameterGatherer | None = None
        if stage == 3:  # from here on only this rank's shards hold parameter values
            own_pieces(self._buckets)
            self.gatherer = ParameterGatherer(modules, self._buckets, group,
                                              self._queue_finish, prefetch,
                                              self.shard_algorithm)
            self.gatherer.settle()
        self.optimizer = ShardedOptimizer(self._buckets, group, optimizer_class, **defaults)
        if stage < 3:
            self.optimizer.regather = RegatherAfterStep(module, self._buckets, group,
                                                        self.shard_algorithm, prefetch)

    # --- nn.Module surface -----------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self._require_sync and torch.is_grad_enabled():
            for t in self.module.buffers():
                comm.broadcast(t, src=0, group=self.group)
        out = self.module(*args, **kwargs)
        if self.gatherer is not None:  # prefetches nobody used: waited for and freed
            self.gatherer.settle()
        self.wait_for_parameters()  # (layers that did not run in this forward)
        return out

    def wait_for_parameters(self) -> None:
        """Stages 1-2: wait for the all-gather of the last ``optimizer.step()``. Needed
        before reading parameters by hand; forward, state dicts, checkpoints and the next
        step wait by themselves (regather.py)."""
        self.optimizer.wait_for_parameters()

    def state_dict(self, *args, **kwargs):
        """The wrapped module's full state dict (parameters are whole between steps; stage
        3 gathers them, so there every rank must call it)."""
        with self._whole():
            return {k: v.clone() for k, v in self.module.state_dict(*args, **kwargs).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Whole parameters into the flat buckets (stage 3: collective; each rank keeps
        its shards of them)."""
        if assign:
            raise ValueError("assign=True would move parameters out of their flat buckets")
        with self._whole():
            result = self.module.load_state_dict(state_dict, strict=strict)
            for b in self._buckets:
                if b.shard is not None:
                    with torch.no_grad():
                        b.shard.copy_(b.pieces(b.flat)[b.rank])
        return result

    def _whole(self):
        return self.gatherer.gathered() if self.gatherer is not None else contextlib.nullcontext()

    def save_sharded(self, directory) -> None:
        """Each rank writes its shard of the parameters and optimizer state into
        ``directory``, rank 0 then meta.json (collective; atomic per file, meta.json last).
        Load with :meth:`load_sharded` (any world size) or, into a plain module,
        ``gradsync.zero.full_state_dict(directory)``; see zero/checkpoint.py."""
        self.wait_for_parameters()
        checkpoint.save_sharded(self, directory)

    def load_sharded(self, directory) -> None:
        """Restore a :meth:`save_sharded` checkpoint, re-sharded if it was written by
        another world size or layout (collective)."""
        self.wait_for_parameters()
        checkpoint.load_sharded(self, directory)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (full-size ``param.grad`` in both stages); the first
        backward outside the block averages and shards the sum."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    @property
    def buckets(self) -> list[ShardedBucket]:
        return self._buckets

    # --- gradient synchronisation ----------------------------------------------------------

    def _reset_step(self) -> None:
        for b in self._buckets:
            b.ready.clear()
        self._works: list[tuple[ShardedBucket, comm.Work, torch.Tensor | None]] = []
        self._next = 0
        self._callback_queued = False

    def _queue_finish(self) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True

    def _on_grad(self, bucket: ShardedBucket, i: int, param: torch.Tensor) -> None:
        if not self._require_sync:
            return
        self._queue_finish()
        if i in bucket.ready:
            raise RuntimeError("a parameter received a gradient twice in one step; wrap all "
                               "but the last backward in no_sync()")
        self._adopt_grad(bucket, i, param.grad)
        bucket.ready.add(i)
        if bucket.is_full():
            self._launch_ready()

    def _adopt_grad(self, bucket: ShardedBucket, i: int, grad: torch.Tensor | None) -> None:
        """Put ``grad`` / N into its slot of ``grad_flat`` (dividing first, as DataParallel
        does, costs no extra pass and keeps low-precision sums from overflowing)."""
        if bucket.grad_flat is None:  # stage 2: the bucket's first gradient of this step
            # Every parameter's slot is written below (a gradient or zeros), so only the
            # padding (< N elements) needs zeroing: one pass over the bucket less per step.
            bucket.grad_flat = self._fill.take(bucket)  # borrowed: zero/buffers.py
            bucket.grad_flat[bucket.numel:].zero_()
        view, n, param = bucket.grad_view(i), self.group.size, bucket.params[i]
        if grad is None:  # unused in this step: contributes zero
            view.zero_()
        elif grad.data_ptr() == view.data_ptr():
            view.div_(n)  # stage 1: accumulated in place in its slot under no_sync()
        else:
            torch.div(grad, n, out=view)
        # Stages 2-3 free the full-size gradient: only this rank's piece survives the step.
        param.grad = view if self.stage == 1 else None

    def _launch_ready(self) -> None:
        # Strict index order: bucket b+1 never starts before bucket b on any rank.
        while self._next < len(self._buckets) and self._buckets[self._next].is_full():
            b = self._buckets[self._next]
            pieces = b.pieces(b.grad_flat)  # N views of (k,)
            # reduce_scatter_async copies its input list into its own staging buffer before
            # returning, so stage 1 can receive into its own piece of grad_flat (where
            # param.grad sees it) and stages 2-3 can drop grad_flat now.
            out = None if self.stage == 1 else torch.empty(b.k, dtype=b.flat.dtype)
            work = comm.reduce_scatter_async(pieces[b.rank] if out is None else out, pieces,
                                             op="sum", group=self.group,
                                             algorithm=self.shard_algorithm)
            if self.stage > 1:
                b.grad_flat = None
                self._fill.give_back(b)
                if self.gatherer is not None:  # the bucket's backward is over
                    self.gatherer.free(b)
            self._works.append((b, work, out))
            self._next += 1
            # Each reduce-scatter in flight holds a (N * k,) staging copy of its bucket's
            # gradient until its Work is waited and dropped: left to the end of backward,
            # a full-size gradient of every bucket at once. Waiting for all but the last
            # IN_FLIGHT bounds that; the oldest is usually done by now (run in order).
            while len(self._works) > IN_FLIGHT:
                self._complete(*self._works.pop(0))

    def _finish_backward(self) -> None:
        if not self._require_sync:  # stage 3 under no_sync(): only back to rest
            self._callback_queued = False
            self.gatherer.settle()
            return
        # Buckets whose collective the hooks started while autograd still ran (all of
        # them, unless some parameter got no gradient): the overlap with backward.
        self.launched_during_backward = self._next
        for b in self._buckets:  # parameters without a gradient in this step count as zero
            for i in range(len(b.params)):
                if i not in b.ready:
                    self._adopt_grad(b, i, b.params[i].grad)
                    b.ready.add(i)
        self._launch_ready()
        start = time.perf_counter()
        try:
            while self._works:
                self._complete(*self._works.pop(0))
        finally:
            self.comm_wait_s += time.perf_counter() - start
            self._reset_step()
            if self.gatherer is not None:
                self.gatherer.settle()

    def _complete(self, b: ShardedBucket, work: comm.Work, out: torch.Tensor | None) -> None:
        """Wait for bucket ``b``'s collective and give its piece the averaged gradient
        (the caller drops ``work``, and with it the collective's staging buffer)."""
        work.wait()
        if b.piece is not None:
            self._set_piece_grad(b, out)

    def _set_piece_grad(self, b: ShardedBucket, out: torch.Tensor | None) -> None:
        real = b.piece.numel()
        if out is None:  # stage 1: its averaged piece of grad_flat, as in param.grad
            b.piece.grad = b.grad_flat[b.rank * b.k:b.rank * b.k + real]
        elif b.piece.grad is None:
            b.piece.grad = out[:real]
        else:  # stage 2 without zero_grad(): synced steps add up, as .grad does
            b.piece.grad.add_(out[:real])
