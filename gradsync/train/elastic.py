"""Elastic training: lose a worker and go on with the survivors; take a replacement in.

    loop = ElasticLoop(ElasticWorld.from_env(timeout_s=300), model, make_optimizer,
                       len(train_set), batch_size=32, initial_workers=4)
    loop.run(step_fn, epochs=5)        # step_fn(model, indices, weight) -> loss (float)

``step_fn`` runs forward and backward on ``model`` for the samples ``indices`` and scales
its mean loss by ``weight`` (1 unless the shares of a step differ in size); the loop zeroes
the gradients and steps the optimizer around it. When a collective fails because a member
is lost, the survivors form the next generation (gradsync/comm/elastic.py), agree on the
newest step any of them completed (a completed all-reduce holds every member's gradient, so
that state is exact), take the model and optimizer state of a survivor at that step by
broadcast, and go on: the step that was in flight is done again by the new membership. A
replacement joins the same way at a step boundary, the group's rank 0 having asked the
store whether the membership changed and broadcast the answer.

Data: :class:`~gradsync.data.ElasticOrder` cuts each epoch's order into global batches
shared by whoever is a member, so no sample of an epoch is dropped or seen twice.
``rescale="batch"`` keeps the global batch (``batch_size * initial_workers``; each member's
share grows when one leaves): the run then equals, up to rounding, SGD on those global
batches in one process, whatever the membership. ``rescale="lr"`` keeps each member's batch
and scales the learning rate with the member count (the linear scaling rule).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import comm
from ..allreduce.architecture import AllReduceArchitecture
from ..comm.elastic import ElasticStopped, ElasticWorld, GenerationTimeout
from ..data.sampler import ElasticOrder

log = logging.getLogger(__name__)

# Fault injection for tests and benchmarks: "UID@STEP" makes member UID SIGKILL itself when
# it is about to start step STEP (once: a replacement has another uid). "STEP" in AWAIT_ENV
# makes the members wait at step STEP until the membership changes (a replacement is ready),
# so that a short run still sees the join.
KILL_ENV, AWAIT_ENV = "GRADSYNC_ELASTIC_KILL", "GRADSYNC_ELASTIC_AWAIT"

StepFn = Callable[[nn.Module, list[int], float], float]


@dataclass
class Change:
    """One membership change, as logged and counted in the summary."""

    generation: int
    left: list[int]
    joined: list[int]
    step: int            # the step the new membership starts with
    workers: int
    recover_s: float = float("nan")  # from noticing the change to its first completed step

    def describe(self) -> str:
        who = "; ".join([f"member{'s' * (len(self.left) > 1)} {_ids(self.left)} left"] * bool(
            self.left) + [f"member{'s' * (len(self.joined) > 1)} {_ids(self.joined)} joined"]
            * bool(self.joined)) or "same members"
        return (f"elastic: generation {self.generation}: {who} at step {self.step}; "
                f"{self.workers} workers; recovered in {self.recover_s:.2f} s")


def _ids(uids: list[int]) -> str:
    return ", ".join(str(u) for u in uids)


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    offset: int = 0   # samples of this epoch's order consumed


@dataclass
class ElasticLoop:
    """Elastic data-parallel training of ``model`` (see the module docstring).

    Args:
        world: this worker's membership (gradsync.comm.elastic.ElasticWorld).
        model: the bare model; every member builds the same one.
        make_optimizer: builds the optimizer from the parameters, once per worker.
        dataset_len: samples in the training set.
        batch_size: samples per worker per step at ``initial_workers``.
        initial_workers: the worker count the batch and learning rate were chosen for.
        rescale: "batch" (keep the global batch) or "lr" (keep the per-worker batch and
            scale the learning rate by workers / initial_workers).
        seed, shuffle: the data order (the same on every member).
        check_every: ask whether the membership changed every this many steps (a store
            read on rank 0 and an 8-byte broadcast); a join waits up to this many steps.
        allreduce: keyword arguments of AllReduceArchitecture (algorithm, bucket_cap_mb,
            nonfinite, topology, compression, ...). ``auto`` runs the engine's all-reduce,
            since a lost peer inside a shared-memory all-reduce is found only at the timeout.
            A topology (default "off") describes the first generation's ranks (the members'
            uids); each generation uses it restricted to its members.
    """

    world: ElasticWorld
    model: nn.Module
    make_optimizer: Callable
    dataset_len: int
    batch_size: int
    initial_workers: int
    rescale: str = "batch"
    seed: int = 0
    shuffle: bool = True
    allreduce: dict = field(default_factory=dict)
    check_every: int = 1
    changes: list[Change] = field(default_factory=list)
    position: Position = field(default_factory=Position)

    def __post_init__(self) -> None:
        if self.check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {self.check_every}")
        if self.rescale not in ("batch", "lr"):
            raise ValueError(f"rescale must be 'batch' or 'lr', got {self.rescale!r}")
        options = {"algorithm": "native", "topology": "off", **self.allreduce}
        if options["algorithm"] == "auto":
            options["algorithm"] = "native"
        self.architecture: AllReduceArchitecture | None = None
        self._options = options
        # Built before any group exists: the first optimizer imports modules of torch that
        # keep references to the process group of the moment, which would keep a lost
        # generation's connections open (comm/elastic.py, ElasticWorld.abandon).
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.base_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.order = ElasticOrder(self.dataset_len, self.seed, self.shuffle)
        self._kill = _kill_step(self.world.uid)
        self._await = int(os.environ.get(AWAIT_ENV, "-1"))
        self._awaited = False

    # -- membership ---------------------------------------------------------------------------

    @property
    def group(self) -> comm.Group:
        assert self.world.group is not None
        return self.world.group

    @property
    def wrapped(self) -> nn.Module:
        assert self.architecture is not None and self.architecture.model is not None
        return self.architecture.model

    def global_batch(self, workers: int) -> int:
        return self.batch_size * (self.initial_workers if self.rescale == "batch" else workers)

    def _form(self, noticed: float) -> None:
        """Form the newest generation, rebuild the wrapper on it, agree on the state."""
        before = self.world.members
        group = self.world.form()
        if self.architecture is None:
            self.architecture = AllReduceArchitecture(group, **self._options)
        formed = time.monotonic()
        self.architecture.regroup(group, self.model, members=list(self.world.members))
        wrapped = time.monotonic()
        self._agree_state(group)
        log.debug("member %d: wrapper rebuilt in %.3f s, state agreed in %.3f s",
                  self.world.uid, wrapped - formed, time.monotonic() - wrapped)
        if self.rescale == "lr":
            for g, lr in zip(self.optimizer.param_groups, self.base_lr):
                g["lr"] = lr * group.size / self.initial_workers
        if before:
            members = self.world.members
            self.changes.append(Change(self.world.gen, [u for u in before if u not in members],
                                       [u for u in members if u not in before],
                                       self.position.step, group.size))
            self._noticed = noticed

    def _agree_state(self, group: comm.Group) -> None:
        """Every member takes the position, model and optimizer state of the member that
        completed the most steps (the first such, by group rank)."""
        steps = torch.zeros(group.size, dtype=torch.int64)
        steps[group.rank] = self.position.step + 1  # a replacement has step -1
        comm.all_reduce(steps, op="sum", group=group, algorithm="native")
        src = int(torch.argmax(steps))
        if int(steps.min()) == int(steps.max()):
            return  # every member is at the same step with the same state
        header = torch.tensor([self.position.step, self.position.epoch, self.position.offset],
                              dtype=torch.int64)
        comm.broadcast(header, src=src, group=group, algorithm="native")
        self.position = Position(*(int(v) for v in header))
        tensors = [p.data for p in self.model.parameters()] + list(self.model.buffers())
        if self.position.step > 0:
            _materialize(self.optimizer)
            tensors += [v for p in self.model.parameters()
                        for _, v in sorted(self.optimizer.state[p].items())
                        if isinstance(v, torch.Tensor)]
        with torch.no_grad():
            for t in tensors:
                comm.broadcast(t, src=src, group=group, algorithm="native")

    # -- the loop -----------------------------------------------------------------------------

    def run(self, step_fn: StepFn, *, steps: int | None = None, epochs: int | None = None,
            on_step: Callable[[dict], None] | None = None) -> Position:
        """Train until ``steps`` steps or ``epochs`` epochs are done; returns the position.

        Raises:
            ElasticStopped: fewer than the minimum number of workers are left.
            CommError: a failure that is not a lost member (a timeout with every member
                alive), or no new generation formed within the timeout.
        """
        if steps is None and epochs is None:
            raise ValueError("give steps or epochs")
        pending: BaseException | None = None
        noticed = time.monotonic()
        if self.world.group is None and self.world.uid >= self.initial_workers:
            self.position = Position(step=-1)
            self.world.announce_ready()
        while True:
            try:
                if pending is not None or self.world.group is None:
                    self._form(noticed)
                pending = None
                if self._train(step_fn, steps, epochs, on_step):
                    return self.position
                noticed = time.monotonic()  # a join or a loss announced at a step boundary
                pending = RuntimeError("membership changed")
            except ElasticStopped:
                raise
            except GenerationTimeout as exc:
                if pending is None:
                    raise
                raise GenerationTimeout(f"{exc}, after: {pending}") from pending
            except comm.CommError as exc:
                noticed = time.monotonic()
                log.debug("member %d: %s; forming the next generation", self.world.uid, exc)
                _drop_frames(exc)  # they hold the failed group's handles
                if self.architecture is not None:
                    self.architecture.release()
                self.world.abandon()
                pending = exc

    def _wait_for_change(self) -> None:
        deadline = time.monotonic() + self.world.timeout_s
        while not self.world.changed() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _done(self, steps: int | None, epochs: int | None) -> bool:
        p = self.position
        return (steps is not None and p.step >= steps) or (
            steps is None and epochs is not None and p.epoch >= epochs)

    def _train(self, step_fn: StepFn, steps, epochs, on_step) -> bool:
        """Run steps until done (True) or until the membership changes (False)."""
        group, flag = self.group, torch.zeros(1, dtype=torch.int64)
        while not self._done(steps, epochs):
            p = self.position
            if p.step % self.check_every == 0 or p.step == self._await:
                if group.rank == 0 and p.step == self._await and not self._awaited:
                    self._awaited = True
                    self._wait_for_change()
                flag[0] = int(group.rank == 0 and self.world.changed())
                comm.broadcast(flag, src=0, group=group, algorithm="native")
                if flag[0]:
                    return False
            if p.step == self._kill:
                os.kill(os.getpid(), signal.SIGKILL)
            comm.set_step(p.step, group)
            indices, taken, weight = self.order.batch(
                p.epoch, p.offset, self.global_batch(group.size), group.size, group.rank)
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = step_fn(self.wrapped, indices, weight)
            self.optimizer.step()
            elapsed = time.perf_counter() - t0
            offset = p.offset + taken
            self.position = Position(p.step + 1, p.epoch + (offset >= self.dataset_len),
                                     offset % self.dataset_len)
            if self.changes and math.isnan(self.changes[-1].recover_s):
                change = self.changes[-1]
                change.recover_s = time.monotonic() - self._noticed
                if group.rank == 0:
                    log.warning("%s", change.describe())
            if on_step is not None:
                on_step({"step": self.position.step, "epoch": p.epoch, "loss": loss,
                         "step_time_s": elapsed, "generation": self.world.gen,
                         "workers": group.size, "time": time.time()})
        return True


def _drop_frames(exc: BaseException | None) -> None:
    """Clear the tracebacks of ``exc`` and of the exceptions behind it."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _materialize(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that never stepped its state tensors (zero gradients, one step:
    SGD-momentum and Adam leave the parameters as they are), so that every member holds the
    same state layout before the broadcast overwrites it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _kill_step(uid: int) -> int | None:
    raw = os.environ.get(KILL_ENV, "")
    for item in filter(None, raw.split(",")):
        who, _, step = item.partition("@")
        if who.strip() == str(uid):
            return int(step)
    return None
