"""The state of elastic training and the retry around the training function (Horovod's
``hvd.elastic.State`` and ``@hvd.elastic.run``): the one implementation behind a user's
script (:mod:`gradsync.elastic`, whose docstring shows one) and `gradsync train --elastic`
(ElasticLoop in elastic.py, the same training function written once).

How a change of membership is survived: a collective that fails because a member is lost
raises CommError out of the training function; :meth:`State.retry` drops the failed group,
the survivors form the next generation (gradsync/comm/elastic.py), agree on the newest step
any of them completed (a completed all-reduce holds every member's gradient, so that state
is exact), take the model and optimizer state of a survivor at that step by broadcast and
call the function again: the step that was in flight is done again by the new membership. A
replacement joins at a step boundary: the group's rank 0 asks the store whether the
membership changed (:meth:`State.check_host_updates`, in ``commit()`` and before each
step) and broadcasts the answer; :class:`MembershipChanged` then ends the function and the
next generation forms the same way.

The position (step, epoch, samples of the epoch consumed) advances when the optimizer's
``step()`` returns (a post-hook), so that parameters and position never disagree, whatever
the function does between ``step()`` and ``commit()``. Data: :class:`ElasticOrder` cuts each
epoch's order into global batches shared by whoever is a member, so no sample of an epoch
is dropped or seen twice. ``rescale="batch"`` keeps the global batch (``batch_size *
initial_workers``; each member's share grows when one leaves): the run then equals, up to
rounding, SGD on those global batches in one process, whatever the membership.
``rescale="lr"`` keeps each member's batch and scales the learning rate with the member
count (the linear scaling rule).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from .. import comm
from ..allreduce.architecture import AllReduceArchitecture
from ..comm.elastic import ElasticDone, ElasticStopped, ElasticWorld, GenerationTimeout
from ..data.sampler import ElasticOrder
from .elastic_sync import (AWAIT_ENV, Change, MembershipChanged, Position, Share, agree_state,
                           drop_frames, kill_self, kill_step)

log = logging.getLogger(__name__)
T = TypeVar("T")


class State:
    """What an elastic worker keeps across changes of membership: the model, its optimizer,
    the position in the data, and the values given as keywords.

    Args:
        world: this worker's membership (``gradsync.elastic.init()``).
        model: the bare model; every member builds the same one.
        optimizer: the optimizer of ``model``'s parameters, or a function that builds it
            from them (called once, here).
        dataset_len: samples in the training set.
        batch_size: samples per worker per step at ``initial_workers``.
        initial_workers: the worker count the batch and learning rate were chosen for
            (default: WORLD_SIZE, the launcher's worker count).
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
        **values: numbers kept with the state (``state.best = 0.0``): :meth:`commit` saves
            them, a failure rolls them back to the last commit, and a member that joins or
            fell behind takes them by broadcast.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(self, world: ElasticWorld, model: nn.Module,
                 optimizer: torch.optim.Optimizer | Callable, *, dataset_len: int,
                 batch_size: int, initial_workers: int | None = None, rescale: str = "batch",
                 seed: int = 0, shuffle: bool = True, check_every: int = 1,
                 allreduce: dict | None = None, **values: float) -> None:
        if initial_workers is None:  # the launcher's worker count, replacements' too
            initial_workers = int(os.environ.get("WORLD_SIZE", "0"))
        for name, value, least in (("batch_size", batch_size, 1),
                                   ("initial_workers", initial_workers, 1),
                                   ("check_every", check_every, 1)):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if rescale not in ("batch", "lr"):
            raise ValueError(f"rescale must be 'batch' or 'lr', got {rescale!r}")
        bad = [k for k, v in values.items() if isinstance(v, bool) or
               not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"values kept with the state must be numbers: {', '.join(bad)}")
        self.world, self.module, self.dataset_len = world, model, dataset_len
        self.batch_size, self.initial_workers, self.rescale = batch_size, initial_workers, rescale
        self.check_every = check_every
        self._options = {"algorithm": "native", "topology": "off", **(allreduce or {})}
        if self._options["algorithm"] == "auto":
            self._options["algorithm"] = "native"
        self.architecture: AllReduceArchitecture | None = None
        # Built before any group exists: the first optimizer imports modules of torch that
        # keep references to the process group of the moment, which would keep a lost
        # generation's connections open (comm/elastic.py, ElasticWorld.abandon).
        self.optimizer = (optimizer if isinstance(optimizer, torch.optim.Optimizer)
                          else optimizer(model.parameters()))
        self.optimizer.register_step_post_hook(lambda *_: self._complete())
        self.base_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.order = ElasticOrder(dataset_len, seed, shuffle)
        self.position, self.changes = Position(), []
        self._step: tuple[Position, int] | None = None  # the step handed out, its size
        self._checked = 0                    # the step whose boundary was checked
        self._kill = kill_step(world.uid)
        self._await = int(os.environ.get(AWAIT_ENV, "-1"))
        self._noticed = 0.0
        taken = sorted(k for k in values if k in self.__dict__ or hasattr(State, k))
        if taken:
            raise ValueError(f"{', '.join(taken)}: a name of State itself, not a value")
        self._values = dict(values)          # the committed ones; live ones are attributes
        self.__dict__.update(values)

    # -- what a training function reads -------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model wrapped for this generation (gradsync.DataParallel): call it for the
        forward pass, so that backward averages the gradients over the members."""
        if self.architecture is None or self.architecture.model is None:
            raise RuntimeError("the model is wrapped once a generation has formed: use it in "
                               "the function decorated with gradsync.elastic.run")
        return self.architecture.model

    @property
    def group(self) -> comm.Group:
        if self.world.group is None:
            raise RuntimeError("no generation has formed yet: use the group in the function "
                               "decorated with gradsync.elastic.run")
        return self.world.group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def step(self) -> int:  # steps completed (by every member: the position is agreed)
        return self.position.step

    @property
    def epoch(self) -> int:  # the epoch the next step belongs to
        return self.position.epoch

    def global_batch(self, workers: int) -> int:
        return self.batch_size * (self.initial_workers if self.rescale == "batch" else workers)

    def batches(self, steps: int | None = None) -> Iterator[Share]:
        """This worker's share of each remaining step of the current epoch (or up to
        ``steps`` steps in all). Each step starts at a step boundary (membership checked);
        the step is done when the optimizer's ``step()`` returns (or, failing that, when the
        next share is asked for)."""
        epoch = self.position.epoch
        while self.position.epoch == epoch and (steps is None or self.position.step < steps):
            self._boundary()
            p, group = self.position, self.group
            comm.set_step(p.step, group)
            indices, taken, weight = self.order.batch(
                p.epoch, p.offset, self.global_batch(group.size), group.size, group.rank)
            self._step = (p, taken)
            yield Share(indices, weight)
            self._complete()

    # -- commit, restore, membership -----------------------------------------------------------

    def commit(self) -> None:
        """Save the values kept with the state, then check for a new membership at this
        step boundary (collective). Call it after ``optimizer.step()``.

        Raises:
            MembershipChanged: a replacement is ready; :meth:`retry` lets it join.
        """
        self._complete()
        self._values = {k: getattr(self, k) for k in self._values}
        self._boundary()

    def restore(self) -> None:
        """Roll the values kept with the state back to the last commit (after a failure;
        the model and optimizer are agreed by broadcast instead)."""
        self.__dict__.update(self._values)

    def check_host_updates(self) -> None:
        """Collective: raise MembershipChanged if the coordinator published a newer
        generation (rank 0 reads the store and broadcasts the answer)."""
        flag, group = torch.zeros(1, dtype=torch.int64), self.group
        flag[0] = int(group.rank == 0 and self.world.changed())
        comm.broadcast(flag, src=0, group=group, algorithm="native")
        if flag[0]:
            raise MembershipChanged(f"generation {self.world.gen} is not the newest")

    def _boundary(self) -> None:
        """Before step ``position.step``: check the membership (every ``check_every`` steps,
        once per step), then the fault injection."""
        step, wait = self.position.step, self.position.step == self._await
        if step != self._checked and (step % self.check_every == 0 or wait):
            self._checked = step
            if wait:  # fault injection: rank 0 waits here until a replacement is ready
                self._await = -1
                deadline = time.monotonic() + self.world.timeout_s
                while (self.rank == 0 and not self.world.changed()
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
            self.check_host_updates()
        if step == self._kill:
            kill_self()

    def _complete(self) -> None:
        """The step handed out is done (its optimizer step returned): advance the position."""
        if self._step is None:
            return
        (p, taken), self._step = self._step, None
        offset = p.offset + taken
        self.position = Position(p.step + 1, p.epoch + (offset >= self.dataset_len),
                                 offset % self.dataset_len)
        self.world.step = self.position.step  # for the heartbeat
        if self.changes and math.isnan(self.changes[-1].recover_s):
            change = self.changes[-1]
            change.recover_s = time.monotonic() - self._noticed
            if self.group.rank == 0:
                log.warning("%s", change.describe())

    def _form(self, noticed: float) -> None:
        """Form the newest generation, rebuild the wrapper on it, agree on the state."""
        before = self.world.members
        group = self.world.form()
        if self.architecture is None:
            self.architecture = AllReduceArchitecture(group, **self._options)
        formed = time.monotonic()
        self.architecture.regroup(group, self.module, members=list(self.world.members))
        wrapped = time.monotonic()
        self._step = None  # a step in flight is done again; its gradients are stale
        self.optimizer.zero_grad(set_to_none=True)
        self.position, values = agree_state(group, self.position, self.module, self.optimizer,
                                            self._values)
        self._values = values
        self.restore()
        self._checked = self.position.step
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

    def retry(self, body: Callable[[], T]) -> T:
        """Run ``body`` until it returns, forming a new generation and agreeing on the state
        first, and again after each change of membership (``gradsync.elastic.run``).

        Raises:
            ElasticStopped: fewer than the minimum number of workers are left.
            ElasticDone: a replacement that came after the run finished.
            CommError: a failure that is not a lost member (a timeout with every member
                alive), or no new generation formed within the timeout.
        """
        pending: BaseException | None = None
        noticed = time.monotonic()
        if self.world.group is None and self.world.uid >= self.initial_workers:
            self.position = Position(step=-1)  # a replacement: it takes the state
            self.world.announce_ready()
        while True:
            try:
                if pending is not None or self.world.group is None:
                    self._form(noticed)
                pending = None
                return body()
            except (ElasticStopped, ElasticDone):
                raise
            except GenerationTimeout as exc:
                if pending is None:
                    raise
                raise GenerationTimeout(f"{exc}, after: {pending}") from pending
            except (MembershipChanged, comm.CommError) as exc:
                noticed = time.monotonic()
                log.debug("member %d: %s; forming the next generation", self.world.uid, exc)
                drop_frames(exc)  # they hold the failed group's handles (the wrapper, ...)
                if self.architecture is not None:
                    self.architecture.release()
                self.world.abandon()
                self.restore()
                pending = exc

