"""``hvd.elastic``: Horovod's elastic API on gradsync's elastic recovery (gradsync.elastic).

    hvd.init()                                   # under `gradsync run --elastic`
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=...)
    sampler = hvd.elastic.ElasticSampler(dataset)

    @hvd.elastic.run                             # called again after each change
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            ...
            state.commit()                       # a snapshot, then: did the hosts change?

    train(hvd.elastic.TorchState(model, optimizer, train_sampler=sampler, epoch=0, batch=0))

The membership (who is alive, generations, replacements, cutting a lost peer's connections)
is gradsync's ElasticWorld, the retry loop gradsync.train.elastic_state.State's: TorchState
is that State with Horovod's semantics on top:

- ``commit()`` keeps a copy of the model, the optimizer, the samplers and the values, then
  checks for new hosts (``HostsUpdatedInterrupt``);
- a failed collective raises ``HorovodInternalError`` (gradsync's CommError): the state is
  rolled back to the last commit (``restore()``), a new generation forms, the state is synced
  from a member at the newest commit (rank 0 at the start) and the function runs again;
- ``HostsUpdatedInterrupt``: no roll-back; the new generation forms and syncs the same way.

``hvd.size()`` and ``hvd.rank()`` follow the generation. Values kept with the state must be
numbers (they travel as float64 tensors; nothing is pickled).
"""

from __future__ import annotations

import copy
import functools

import torch

from .. import comm
from .. import elastic as gradsync_elastic
from ..comm.errors import CommError
from ..train.elastic_state import State
from ..train.elastic_sync import MembershipChanged, Position, agree_state
from .elastic_job import JOB
from .optimizer import DistributedOptimizer
from .sampler import ElasticSampler

__all__ = ["ElasticSampler", "HorovodInternalError", "HostsUpdatedInterrupt", "TorchState",
           "run"]

HorovodInternalError = CommError  # what every failed collective raises


class HostsUpdatedInterrupt(MembershipChanged):
    """Raised by ``commit()`` / ``check_host_updates()`` when the membership changed: the
    state is kept (not rolled back), and the next generation syncs it."""

    def __init__(self, skip_sync: bool = False):
        super().__init__("the hosts were updated")
        self.skip_sync = skip_sync


class _Snapshot:
    """What ``commit()`` keeps: copies of the model's and optimizer's state dicts, the
    samplers' states, and the position (commits) they belong to."""

    def __init__(self, state: "TorchState"):
        self.step = state.position.step
        self.model = copy.deepcopy(state.module.state_dict())
        self.optimizer = copy.deepcopy(state.optimizer.state_dict())
        self.samplers = {k: s.state_dict() for k, s in state.samplers.items()}

    def load(self, state: "TorchState") -> None:
        state.module.load_state_dict(self.model)
        state.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        for k, s in state.samplers.items():
            s.load_state_dict(self.samplers[k])


class _Horovod:
    """Stands where State keeps its AllReduceArchitecture: the script's own model and
    hvd.DistributedOptimizer do the all-reduce, so a new generation only rebinds them."""

    def __init__(self, state: "TorchState"):
        self.state, self.model, self.formed = state, state.module, False

    def regroup(self, group: comm.Group, module, members) -> None:
        """(State._form, before the state is agreed.) Rebind, re-cut the samplers, call the
        reset callbacks (not at the first generation)."""
        state = self.state
        self.rebind(group)
        state.sync_samplers()
        if self.formed:
            for callback in state.reset_callbacks:
                callback()
        self.formed = True

    def rebind(self, group: comm.Group) -> None:
        if isinstance(self.state.optimizer, DistributedOptimizer):
            self.state.optimizer.regroup(group)
        self.state._local(True)  # until restore(), which State calls once agreed

    def release(self) -> None:
        if isinstance(self.state.optimizer, DistributedOptimizer):
            self.state.optimizer._works = []  # the failed group's handles


class TorchState(State):
    """Horovod's ``hvd.elastic.TorchState(model, optimizer, **kwargs)``.

    Args:
        model: the script's model (not wrapped: hvd.DistributedOptimizer reduces).
        optimizer: an hvd.DistributedOptimizer (or a plain optimizer of a model that the
            script reduces itself).
        **kwargs: ElasticSampler objects (kept, re-cut over each generation), and numbers
            kept with the state (``epoch=0, batch=0``), as attributes: ``state.epoch``.
    Raises:
        RuntimeError: not started by `gradsync run --elastic` (hvd.init() joins the job).
        ValueError: a value that is not a number.
    """

    epoch = None  # plain attributes here (State's are read-only properties): Horovod's
    step = None   # scripts write ``for state.epoch in range(state.epoch, n)``

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
        if not JOB:
            raise RuntimeError("hvd.elastic.TorchState needs an elastic job: start the script "
                               "with `gradsync run --elastic ...` and call hvd.init() first")
        samplers = {k: v for k, v in kwargs.items() if isinstance(v, ElasticSampler)}
        values = {k: v for k, v in kwargs.items() if k not in samplers}
        bad = [k for k, v in values.items() if isinstance(v, bool) or
               not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"values kept with the state must be numbers: {', '.join(bad)}")
        # dataset_len and batch_size are State.batches()'s, which Horovod scripts do not use.
        super().__init__(JOB[0], model, optimizer, dataset_len=1, batch_size=1)
        self.samplers, self.reset_callbacks = samplers, []
        self.__dict__.update(samplers)
        self._values = dict(values)
        self.__dict__.update(values)
        self.architecture = _Horovod(self)
        self._snapshot: _Snapshot | None = None
        self._synced = False
        if self.world.uid >= self.initial_workers:
            self.position = Position(step=-1)  # a replacement: it takes the state

    # -- Horovod's surface -----------------------------------------------------------------

    def register_reset_callbacks(self, callbacks) -> None:
        """Call each of ``callbacks`` (no arguments) after every change of membership."""
        self.reset_callbacks.extend(callbacks)

    def commit(self) -> None:
        """Keep a copy of the state (what ``restore()`` returns to), then check for new
        hosts (collective).

        Raises:
            HostsUpdatedInterrupt: the membership changed; ``hvd.elastic.run`` goes on.
        """
        self._values = {k: getattr(self, k) for k in self._values}
        # The position counts commits: State completes a "step" of no samples (and logs a
        # membership change at the first one after it).
        self._step = (self.position, 0)
        self._complete()
        self._snapshot = _Snapshot(self)
        self._boundary()  # check_host_updates, and the fault injection of tests

    def restore(self) -> None:
        """Return to the last commit. (Also State's call after a generation agreed on the
        state: a member whose commit was not the newest keeps the agreed state instead.)"""
        self._local(False)
        if self._snapshot is not None and self._snapshot.step == self.position.step:
            self._snapshot.load(self)
        elif self.world.group is not None:
            self._snapshot = _Snapshot(self)  # the state just taken from a peer
        self.__dict__.update(self._values)

    def check_host_updates(self) -> None:
        """Collective: raise HostsUpdatedInterrupt when the membership changed; the state
        at this moment is what the next generation continues from."""
        try:
            super().check_host_updates()
        except MembershipChanged:
            self._values = {k: getattr(self, k) for k in self._values}
            self._snapshot = _Snapshot(self)
            raise HostsUpdatedInterrupt() from None

    def sync(self) -> None:
        """Collective: every member takes the state of the member at the newest commit
        (rank 0 when all are equal, as at the start): model, optimizer, samplers, values."""
        group = self.group
        self.architecture.rebind(group)
        self.sync_samplers()
        if self.position.step == 0 and group.rank != 0:
            self.position = Position(step=-1)  # equal positions: rank 0's state wins
        self.position, self._values = agree_state(group, self.position, self.module,
                                                  self.optimizer, self._values)
        self._local(False)
        self.__dict__.update(self._values)
        self._snapshot = _Snapshot(self)

    def _local(self, on: bool) -> None:
        """While the state is agreed, the optimizer steps without reducing: agree_state
        steps it once with zero gradients on a member that has no optimizer state yet."""
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer._should_synchronize = not on

    def sync_samplers(self) -> None:
        """Collective: every sampler takes the union of the members' processed indices and
        is re-cut over the current members."""
        for sampler in self.samplers.values():
            sampler.sync()
        if self._snapshot is not None:
            self._snapshot.samplers = {k: s.state_dict() for k, s in self.samplers.items()}

    def _start(self) -> None:
        """Before the training function first runs: sync (Horovod's first state.sync())."""
        if not self._synced:
            self._synced = True
            self.sync()


def run(func):
    """Decorator (Horovod's ``@hvd.elastic.run``): ``func(state, ...)`` runs after the
    state is synced, and again after each change of membership, until it returns."""
    @functools.wraps(func)
    def body(state: TorchState, *args, **kwargs):
        state._start()
        return func(state, *args, **kwargs)

    return gradsync_elastic.run(body)
