"""Bucketed data parallelism whose all-reduces overlap the backward pass.

A drop-in for ``torch.nn.parallel.DistributedDataParallel`` on CPU. At wrap time every rank
checks that it holds the same parameters (count, shapes, dtypes: a mismatch is an error that
names the ranks and shapes) and takes rank 0's values. During backward a hook on each
parameter copies its gradient into its bucket's flat buffer and points ``param.grad`` at that
slice; the moment a bucket is complete, its averaging all-reduce starts on the comm thread
(or the engine) while autograd goes on with earlier layers. A callback at the end of backward
waits for the buckets, so when ``loss.backward()`` returns every ``.grad`` holds the average
over ranks. Buckets are launched strictly in index order on every rank, so ranks pair up the
same collectives even if their hooks fire in a different order.

Usage::

    model = gradsync.DataParallel(model)          # after init_process_group
    loss_fn(model(x), y).backward()               # gradients averaged on return
    optimizer.step()
    with model.no_sync():                         # accumulate locally, no communication
        loss_fn(model(x2), y2).backward()
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .. import comm
from .bucket_reduce import (BucketTrace, attach_topology, bucket_algorithms, hook_work,
                            share_buckets)
from .buckets import Bucket, build_buckets
from .nonfinite import NONFINITE_POLICIES, NonFiniteGradientError, describe, find_culprits

log = logging.getLogger(__name__)


@dataclass
class DataParallelStats:
    """What DataParallel measured since the last :meth:`DataParallel.reset_stats`."""

    sync_steps: int = 0
    comm_wait_s: float = 0.0  # time backward's end spent waiting for all-reduces (not overlapped)
    skipped_steps: int = 0    # steps whose averaged gradient was not finite (nonfinite="skip")


class DataParallel(nn.Module):
    """Average gradients across the ranks of ``group`` during backward.

    Args:
        module: the model; every rank must build the same architecture.
        group: the ranks to average over (default: all; the process group is created from
            torchrun's environment if the script has not done so).
        bucket_cap_mb: size of a gradient bucket in MiB (the first bucket is at most 1 MiB).
        algorithm: all-reduce algorithm for the buckets, one of
            ``gradsync.comm.ALL_REDUCE_ALGORITHMS``; ``auto`` means the engine's (see below).
        find_unused_parameters: treat parameters without a gradient in a step as contributing
            zero, instead of raising an error that names them.
        broadcast_buffers: copy rank 0's buffers (e.g. BatchNorm statistics) before each forward.
        topology: the hosts and links that ``auto`` takes into account: ``"probe"`` (default)
            measures them when the group spans several hosts (bounded, about a second; one
            small all-gather on a single host), a :class:`gradsync.comm.Topology` or the path
            of its JSON file uses that, ``None`` ignores the network. With unequal links or
            several ranks per host, ``auto`` then lets the cost model pick ``aware`` or
            ``hierarchical`` for the buckets.
        nonfinite: what a NaN or Inf in the averaged gradients does: ``"error"`` raises
            :class:`NonFiniteGradientError` from ``backward()`` naming the ranks that sent it
            and the step; ``"skip"`` sets every ``.grad`` to None, so ``optimizer.step()``
            leaves the parameters and optimizer state as they were, and logs a warning.
        device_ids, output_device: accepted for DDP compatibility; must be None on CPU.
    Raises:
        CollectiveMismatchError: ranks hold different parameters.
    """

    def __init__(self, module: nn.Module, *, group: comm.Group | None = None,
                 bucket_cap_mb: float = 25.0, algorithm: str = "auto",
                 find_unused_parameters: bool = False, broadcast_buffers: bool = True,
                 nonfinite: str = "error", topology: "comm.Topology | str | None" = "probe",
                 device_ids=None, output_device=None):
        super().__init__()
        if device_ids not in (None, []) or output_device is not None:
            raise ValueError("device_ids/output_device are for CUDA modules; leave them None")
        comm.check_algorithm(algorithm)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of "
                             f"{', '.join(NONFINITE_POLICIES)}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if group is None:
            group = comm.world() if comm.is_initialized() else comm.init_process_group()
        self.module = module
        self.group = group
        self.algorithm = algorithm
        attach_topology(group, topology)
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self.nonfinite = nonfinite
        self.stats = DataParallelStats()

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in named}
        comm.verify_tensors(group, "parameters and buffers",
                            [(n, p.detach()) for n, p in module.named_parameters()]
                            + list(module.named_buffers()))
        self._broadcast([p.data for p in module.parameters()] + list(module.buffers()))

        self._buckets: list[Bucket] = build_buckets([p for _, p in named],
                                                    int(bucket_cap_mb * (1 << 20)))
        self.bucket_algorithms = bucket_algorithms(self._buckets, algorithm, group)
        self._shared = share_buckets(self._buckets, self.bucket_algorithms, group)
        self._handles = []
        for b, bucket in enumerate(self._buckets):
            for i, p in enumerate(bucket.params):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    partial(self._on_grad, b, i)))
        self._hook = self._hook_state = None
        self._require_sync = True
        self._trace: BucketTrace | None = None  # --timeline; None: no cost but a test
        self._reset_step()
        from ..run.timeline import script_timeline  # a script under `gradsync run --timeline`
        self.set_timeline(script_timeline(group))

    # --- nn.Module surface -----------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self._require_sync and torch.is_grad_enabled():
            buffers = list(self.module.buffers())
            if buffers and self.group.size > 1:
                self._broadcast(buffers)
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict, without a wrapper prefix."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the first backward outside the block averages the sum."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def register_comm_hook(self, state, hook) -> None:
        """Average every bucket with ``hook(state, bucket)`` instead of the all-reduce (DDP's
        contract, see :mod:`gradsync.compress.bucket`): e.g. the compressors of
        :mod:`gradsync.compress`, or a hook written for DDP. Call it once, before the first
        backward."""
        if self._hook is not None:
            raise RuntimeError("a comm hook is already registered; register one only once")
        if self.stats.sync_steps or self._works:
            raise RuntimeError("register_comm_hook must be called before the first backward")
        if not callable(hook):
            raise TypeError(f"hook must be callable as hook(state, bucket), got {hook!r}")
        self._hook, self._hook_state = hook, state

    def set_timeline(self, timeline) -> None:
        """Record each bucket's collective and the wait at the end of backward into
        ``timeline`` (a :class:`gradsync.observe.Timeline`; None stops)."""
        self._trace = None if timeline is None else BucketTrace(
            timeline, self._buckets, self.bucket_algorithms)

    def bucket_layout(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order."""
        return [[self._names[id(p)] for p in b.params] for b in self._buckets]

    # --- gradient synchronisation ----------------------------------------------------------

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into ``tensors``: one broadcast per dtype, through a flat copy."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group_tensors in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in group_tensors])
                comm.broadcast(flat, src=0, group=self.group)
                offset = 0
                for t in group_tensors:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def _reset_step(self) -> None:
        for bucket in self._buckets:
            bucket.ready.clear()
        self._works: list[comm.Work] = []
        self._local_finite = True  # this rank's own gradients, before averaging
        self._next = 0
        self._callback_queued = False

    def _on_grad(self, b: int, i: int, param: torch.Tensor) -> None:
        if not self._require_sync:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        bucket = self._buckets[b]
        if i in bucket.ready:
            raise RuntimeError(f"parameter {self._names[id(param)]!r} received a gradient twice "
                               "in one step; wrap all but the last backward in no_sync()")
        self._adopt_grad(bucket, i, param.grad)
        bucket.ready.add(i)
        if bucket.is_full():
            self._launch_ready()

    def _adopt_grad(self, bucket: Bucket, i: int, grad: torch.Tensor | None) -> None:
        """Move a gradient, divided by the world size, into its bucket slot and make
        ``param.grad`` that slot, so the summed result is the average with no copy back.

        Dividing on the way in costs nothing extra (it is the copy) where dividing after the
        all-reduce would be one more pass over every bucket at the end of backward, and it
        keeps float16 sums from overflowing.
        """
        view = bucket.view(i)
        # With a comm hook the bucket holds this rank's own gradients: averaging is the
        # hook's job (DDP's contract), so hooks written for DDP divide once, as there.
        n = self.group.size if self._hook is None else 1
        if grad is None:
            view.zero_()
        elif grad.data_ptr() != view.data_ptr():
            if n > 1:
                torch.div(grad, n, out=view)
            else:
                view.copy_(grad)
        elif n > 1:
            view.div_(n)  # accumulated in place under no_sync()
        bucket.params[i].grad = view

    def _launch_ready(self) -> None:
        # Strict index order: bucket k+1 never starts before bucket k on any rank.
        while self._next < len(self._buckets) and self._buckets[self._next].is_full():
            flat = self._buckets[self._next].flat
            self._local_finite &= comm.all_finite(flat)
            launch = time.perf_counter() if self._trace is not None else 0.0
            if self._hook is None and self._shared is not None:
                work = self._shared.all_reduce_async(self._next, op="sum")
            elif self._hook is None:
                work = comm.all_reduce_async(flat, op="sum", group=self.group,
                                             algorithm=self.bucket_algorithms[self._next])
            else:
                work = hook_work(self._hook, self._hook_state, self._buckets[self._next],
                                 len(self._buckets), self.group)
            if self._trace is not None:
                self._trace.launched(work, launch, hooked=self._hook is not None)
            self._works.append(work)
            self._next += 1

    def _finish_backward(self) -> None:
        missing = [(b, i) for b, bucket in enumerate(self._buckets)
                   for i in range(len(bucket.params)) if i not in bucket.ready]
        if missing and not self.find_unused_parameters:
            names = [self._names[id(self._buckets[b].params[i])] for b, i in missing]
            self._wait_all()
            self._reset_step()
            raise RuntimeError(f"parameters received no gradient in this step: {names}; "
                               "pass find_unused_parameters=True to treat them as zero")
        for b, i in missing:
            bucket = self._buckets[b]
            self._adopt_grad(bucket, i, bucket.params[i].grad)
            bucket.ready.add(i)
        self._launch_ready()
        self._wait_all()
        local_finite = self._local_finite
        self._reset_step()
        self.stats.sync_steps += 1
        bad = [b for b in self._buckets if not comm.all_finite(b.flat)]  # the same on every rank
        if bad:
            self._on_nonfinite(bad, local_finite)

    def _on_nonfinite(self, bad: list[Bucket], local_finite: bool) -> None:
        step = self.group.step if self.group.step >= 0 else self.stats.sync_steps - 1
        params = [self._names[id(p)] for b in bad for i, p in enumerate(b.params)
                  if not comm.all_finite(b.view(i))]
        text = describe(find_culprits(self.group, local_finite), step, params)
        if self.nonfinite == "error":
            raise NonFiniteGradientError(f"{text}; lower the learning rate, or pass "
                                         "nonfinite='skip' (--on-nonfinite skip) to skip "
                                         "such steps")
        for bucket in self._buckets:
            for p in bucket.params:
                p.grad = None
        self.stats.skipped_steps += 1
        if self.group.rank == 0:
            log.warning("skipping the update of step %d: %s", step, text)

    def _wait_all(self) -> None:
        start, trace = time.perf_counter(), self._trace
        try:
            for k, work in enumerate(self._works):
                work.wait()
                if trace is not None:
                    trace.completed(k)
        finally:
            end = time.perf_counter()
            self.stats.comm_wait_s += end - start
            if trace is not None:
                trace.finish_step(start, end)
