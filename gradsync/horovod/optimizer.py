"""Horovod's ``DistributedOptimizer`` on gradsync's bucketed all-reduce.

Gradients are fused into gradsync's buckets (gradsync/allreduce/buckets.py, filled in
reverse registration order, the order backward produces them). A post-accumulate hook on
each parameter copies its gradient into the bucket, divided on the way in for Average (one
pass, as DataParallel does), and points ``param.grad`` at that slice; the moment a bucket is
full its all-reduce starts (comm.all_reduce_async with the algorithm DataParallel would
choose, in shared memory when every rank is on one host; or a gradsync compression hook
through DataParallel's ``hook_work``), overlapping the rest of backward. Buckets start strictly in
index order on every rank, so the ranks pair up the same collectives. ``step()`` (or
``synchronize()``) waits for them; a parameter whose gradient never came is all-reduced
then (as zeros when it has none), as in Horovod.

Usage, as Horovod documents it::

    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    loss.backward()
    opt.synchronize()                                   # gradients averaged
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with opt.skip_synchronize():
        opt.step()

The wrapper is a ``torch.optim.Optimizer`` (LR schedulers accept it) that delegates
``param_groups``, ``state`` and ``state_dict`` to the wrapped optimizer, instead of Horovod's
dynamically created subclass.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from functools import partial

import torch

from .. import comm
from ..allreduce.bucket_reduce import BucketTrace, hook_work
from ..allreduce.buckets import Bucket
from ..compress.spec import make_hook
from ..run.timeline import script_timeline
from .basics import Average, global_process_set, in_elastic_job, resolve_op
from .compression import Compression
from .join import OPTIMIZER, negotiate, register_optimizer
from .fusion import _bucket, _names, place_buckets, plan_buckets

BUCKET_CAP_MB = 25.0  # gradsync DataParallel's default (Horovod's fusion buffer: 64 MB)


class DistributedOptimizer(torch.optim.Optimizer):
    """Average (or Sum, Min, Max, Product) gradients over the process set while backward
    runs; ``step()`` waits for them, then steps ``optimizer``.

    Args:
        optimizer: a torch optimizer over the model's parameters.
        named_parameters: ``model.named_parameters()``, for error messages.
        compression: Compression.none, .fp16, .bf16, .topk(r), .powersgd(k) (gradsync's hooks;
            they average, so they need op=Average and gradient_predivide_factor=1).
        backward_passes_per_step: backward passes accumulated locally (summed, as in
            Horovod) before the all-reduce.
        op: Average, Sum, Min, Max or Product (Adasum: ValueError).
        gradient_predivide_factor: Average as sum(g / f) * f / size.
        groups: an int (that many buckets) or lists of parameters (one bucket each).
        sparse_as_dense: sparse gradients travel as dense ones (otherwise: ValueError).
        process_set: the ranks to reduce over.
        bucket_cap_mb: gradsync's bucket size when ``groups`` is None.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters=None,
                 compression=Compression.none, backward_passes_per_step: int = 1,
                 op=Average, gradient_predivide_factor: float = 1.0, groups=None,
                 sparse_as_dense: bool = False, process_set=global_process_set,
                 bucket_cap_mb: float = BUCKET_CAP_MB):
        # No Optimizer.__init__: the wrapped optimizer owns param_groups and state.
        self.optimizer, self.group, self.op = optimizer, process_set.resolve(), resolve_op(op)
        self._process_set, self._join_index = process_set, register_optimizer(self)
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got "
                             f"{backward_passes_per_step}")
        if gradient_predivide_factor != 1.0 and self.op is not Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        self.backward_passes_per_step, self.sparse_as_dense = backward_passes_per_step, \
            sparse_as_dense
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._names = _names(named_parameters, params)
        if compression.spec.name != "none" and (self.op is not Average
                                                or gradient_predivide_factor != 1.0):
            raise ValueError(f"compression {compression.spec} averages: it needs "
                             "op=Average and gradient_predivide_factor=1")
        self._compression, self._predivide = compression, gradient_predivide_factor
        self.regroup(self.group)
        cap = int(bucket_cap_mb * (1 << 20))
        self._buckets = [_bucket(i, b) for i, b in enumerate(plan_buckets(params, groups, cap))]
        self._where = {id(p): (b, i) for b, bucket in enumerate(self._buckets)
                       for i, p in enumerate(bucket.params)}
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._on_grad, p))
                         for p in params]
        plain_sum = self._hook is None and self.op in (Average, comm.ReduceOp.SUM)
        if not in_elastic_job():  # (there a replacement builds its optimizer alone)
            self._algorithms, self._shared = place_buckets(self._buckets, self.group,
                                                           plain_sum)
        self._synchronized, self._should_synchronize = False, True
        self._reset()
        timeline = script_timeline(self.group)  # `gradsync run --timeline`, HOROVOD_TIMELINE
        self._trace = None if timeline is None else BucketTrace(
            timeline, self._buckets, [self._compression.spec.name if self._hook else a
                                      for a in self._algorithms])

    def regroup(self, group: comm.Group) -> None:
        """Reduce over ``group`` from now on (hvd.elastic: each new generation's world);
        gradients of a backward pass in flight are dropped."""
        self.group, self._works = group, []
        if getattr(self, "_shared", None) is not None:  # the old group's shared memory
            for bucket in self._buckets:
                bucket.flat = bucket.flat.clone()
        self._shared = None
        self._algorithms = ["native"] * len(getattr(self, "_buckets", ()))
        self._hook = self._hook_state = None
        if self._compression.spec.name != "none":
            self._hook_state, self._hook = make_hook(self._compression.spec, group)
        # Average: divide by f on the way in, multiply by f / size after (Horovod's split);
        # f = 1 divides by size on the way in and needs no pass after. A hook averages.
        f, n = self._predivide, group.size
        average = self.op is Average and self._hook is None
        self._divide = (f if f != 1.0 else n) if average else 1.0
        self._post = f / n if average and f != 1.0 else 1.0
        if hasattr(self, "_buckets"):
            self._reset()

    # --- the wrapped optimizer's surface ---------------------------------------------------

    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state,
                     lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, v: setattr(self.optimizer, "defaults", v))

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def add_param_group(self, param_group) -> None:
        raise ValueError("add parameter groups to the optimizer before wrapping it in "
                         "hvd.DistributedOptimizer (its hooks are registered then)")

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"

    # --- Horovod's surface -------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._works:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize(). "
                                 "This is prohibited as it can cause a race condition.")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(): gradients are "
                              "all-reduced twice", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        if self._trace is None:
            return self.optimizer.step(closure)
        start = time.perf_counter()
        result = self.optimizer.step(closure)
        self._trace.timeline.record("optimizer step", start, time.perf_counter())
        return result

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``step()`` inside the block does not synchronize (call ``synchronize()`` first)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def synchronize(self) -> None:
        """Finish every bucket's all-reduce; afterwards each ``.grad`` holds the result.
        Parameters whose gradient has not come (unused, or fewer backward passes than
        ``backward_passes_per_step``) go with what they hold: zeros when they have none."""
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                if i not in bucket.ready:
                    self._adopt(bucket, i, self._dense(p))
                    bucket.ready.add(i)
        self._launch_ready()
        wait_start = time.perf_counter()
        for k, (bucket, work) in enumerate(zip(self._buckets, self._works)):
            work.wait()
            if self._trace is not None:
                self._trace.completed(k)
            if self._post != 1.0:
                bucket.flat.mul_(self._post)
        if self._trace is not None:
            self._trace.finish_step(wait_start, time.perf_counter())
        if self._header is not None:
            self._header.wait()
        self._reset()
        self._synchronized = True

    # --- hooks and buckets ---------------------------------------------------------------------

    def _reset(self) -> None:
        for bucket in self._buckets:
            bucket.ready.clear()
        self._works: list[comm.Work] = []
        self._header: comm.Work | None = None  # this step's announcement for hvd.join()
        self._delay = {key: self.backward_passes_per_step for key in self._where}

    def _dense(self, p) -> torch.Tensor | None:
        grad = p.grad
        if grad is not None and grad.is_sparse:
            if not self.sparse_as_dense:
                raise ValueError(f"{self._names[id(p)]} has a sparse gradient: pass "
                                 "sparse_as_dense=True (gradsync reduces dense tensors only)")
            grad = grad.to_dense()
        return grad

    def _on_grad(self, p, _param) -> None:
        key = id(p)
        self._delay[key] -= 1
        if self._delay[key] > 0:
            return  # accumulate locally, in p.grad
        if self._delay[key] < 0:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before "
                "call to step(). Increase backward_passes_per_step to accumulate gradients "
                f"locally ({self._names[key]}).")
        b, i = self._where[key]
        self._adopt(self._buckets[b], i, self._dense(p))
        self._buckets[b].ready.add(i)
        self._launch_ready()

    def _adopt(self, bucket: Bucket, i: int, grad: torch.Tensor | None) -> None:
        """Move ``grad`` (divided for Average) into its bucket slot and make ``p.grad`` that
        slot: the reduced result then needs no copy back."""
        view = bucket.view(i)
        with torch.no_grad():
            if grad is None:
                view.zero_()
            elif grad.data_ptr() != view.data_ptr():
                torch.div(grad, self._divide, out=view)
            elif self._divide != 1.0:
                view.div_(self._divide)  # accumulated in place (zero_grad(set_to_none=False))
        bucket.params[i].grad = view

    def _launch_ready(self) -> None:
        # Strict index order: bucket k+1 never starts before bucket k on any rank.
        while len(self._works) < len(self._buckets) and \
                self._buckets[len(self._works)].is_full():
            if not self._works:  # a step's first bucket: announced for hvd.join()
                self._header = negotiate(OPTIMIZER, self._join_index,
                                         process_set=self._process_set)
            bucket = self._buckets[len(self._works)]
            start = time.perf_counter()
            work = self._launch(bucket)
            self._works.append(work)
            if self._trace is not None:
                self._trace.launched(work, start)

    def _launch(self, bucket: Bucket) -> comm.Work:
        if self._hook is not None:
            return hook_work(self._hook, self._hook_state, bucket, len(self._buckets),
                             self.group)
        if self._shared is not None:  # the gradients are in shared memory already
            return self._shared.all_reduce_async(bucket.index, op="sum")
        wire = comm.ReduceOp.SUM if self.op is Average else self.op
        return comm.all_reduce_async(bucket.flat, op=wire, group=self.group,
                                     algorithm=self._algorithms[bucket.index])

    def contribute_zeros(self) -> None:
        """(hvd.join, on a rank that has joined.) Reduce zeros in place of each bucket, as
        the active ranks reduce their gradients (in shared memory: in the buckets, where
        this rank's gradients were)."""
        if self._shared is not None:
            for bucket in self._buckets:
                bucket.flat.zero_()
        works = [self._launch(b if self._shared is not None else _bucket(b.index, b.params))
                 for b in self._buckets]
        for work in works:
            work.wait()
