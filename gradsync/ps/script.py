"""The Parameter Server from a user's own script, in the manner of BytePS and Horovod's
``DistributedOptimizer``. Run it under torchrun (or `gradsync run`); every rank runs the
same script, and :func:`init` says which ranks serve::

    group = gradsync.comm.init_process_group()
    ps = gradsync.ps.init(servers=1, consistency="sync")
    model = build_model()                       # the same seed on every rank, servers too
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if ps.is_server:
        ps.serve(model, opt)                    # returns when every worker has finished
    else:
        opt = ps.DistributedOptimizer(opt, model)
        sampler = ShardedSampler(dataset, ps.num_workers, ps.worker_rank)
        ...                                     # the usual loop: zero_grad, backward, step
        ps.shutdown()                           # tells the servers; their figures

Nothing here is a second implementation: :func:`init` builds the
:class:`~gradsync.ps.PSArchitecture` that `gradsync train --arch ps` builds (same options,
same placement), servers run its :class:`~gradsync.ps.ParameterServer`, workers its
:class:`~gradsync.ps.PSWorker` and :class:`~gradsync.ps.RemoteOptimizer`. So a script that
trains a workload with the trainer's seeds and data order ends with the CLI's parameters, bit
for bit. The servers build their optimizers from the script's own (its class and
hyper-parameters, one per partition of their shard); the worker's optimizer itself never
steps.

Checkpoints: pass ``arch=ps`` to :class:`gradsync.checkpoint.Checkpointer`, call its
``start()`` on every rank, then ``ps.serve(..., checkpoint=ckpt)`` /
``ps.DistributedOptimizer(..., checkpoint=ckpt)``; servers save their shard and optimizer
state, the first worker the model it pulled (as `gradsync train --arch ps` does).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .. import comm
from .architecture import PSArchitecture
from .server import ServerConfig, ServerStats
from .remote_optimizer import RemoteOptimizer


def init(servers: int = 1, consistency: str = "sync", staleness: int = 0,
         compression: str = "none", *, compression_warmup: int = 0,
         server_ranks: str | list[int] | None = None, partition_mb: float | None = None,
         layout: str = "striped", topology=None, nonfinite: str = "error",
         group: comm.Group | None = None) -> "PSContext":
    """Split the ranks of ``group`` into servers and workers; collective on every rank.

    Args:
        servers: K, the number of servers (--servers).
        consistency: "sync" (equal to SGD on the global batch), "async" or "ssp".
        staleness: the s of ssp (--staleness); ignored by the other modes.
        compression: how workers push: "none", "fp16", "bf16" or "topk:RATIO".
        compression_warmup: steps of plain pushes before compression starts.
        server_ranks: which ranks serve (--server-ranks): "0,2", [0, 2], "colocated";
            None: ranks 0..K-1, or GRADSYNC_ROLE on every rank.
        partition_mb: the largest partition a push carries (None: from the links).
        layout: how partitions are dealt to the servers (--ps-layout): "striped" (in turn)
            or "contiguous" (server k holds the k-th range).
        topology: a :class:`~gradsync.comm.Topology` or a topology file, for the links.
        nonfinite: what a server does with a NaN/Inf gradient, "error" or "skip".
        group: the ranks of the job (None: the world; then :attr:`PSContext.worker_group`
            exists too).

    Raises:
        ValueError: an option is wrong, or no worker is left (the message says which).
    """
    group = group if group is not None else comm.world()
    ServerConfig(consistency, staleness, nonfinite=nonfinite)  # ValueError naming the option
    arch = PSArchitecture(servers, consistency, staleness, group, nonfinite=nonfinite,
                          compression=compression, compression_warmup=compression_warmup,
                          server_ranks=server_ranks, partition_mb=partition_mb,
                          layout=layout, topology=topology)
    return PSContext(arch)


class PSContext:
    """This rank's part in a Parameter-Server job (:func:`init` makes it).

    Attributes:
        architecture: the :class:`~gradsync.ps.PSArchitecture` underneath.
        worker_group: the workers alone (for evaluation, averaging metrics); None on
            servers, and when :func:`init` was given a sub-group.
    """

    def __init__(self, architecture: PSArchitecture):
        self.architecture = architecture
        self.worker_group = None
        if architecture.group.size == comm.world().size:  # every process must join
            self.worker_group = comm.new_group(architecture.workers)
        self._summary: dict[str, Any] | None = None

    # --- who is who ---------------------------------------------------------------------------

    @property
    def is_server(self) -> bool:
        return not self.architecture.is_worker

    @property
    def is_worker(self) -> bool:
        return self.architecture.is_worker

    @property
    def worker_rank(self) -> int:
        """This worker's index among the workers, 0..num_workers-1 (-1 on a server): the
        rank to shard the data with."""
        return self.architecture.worker_rank

    @property
    def num_workers(self) -> int:
        return self.architecture.num_workers

    @property
    def server_ranks(self) -> list[int]:
        return list(self.architecture.servers)

    # --- servers ------------------------------------------------------------------------------

    def serve(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              checkpoint=None) -> ServerStats:
        """Hold this server's shard of ``model``'s parameters and update it with optimizers
        like ``optimizer``, until every worker has called :meth:`shutdown` (or was lost).

        Args:
            checkpoint: a started :class:`gradsync.checkpoint.Checkpointer` with
                ``arch=`` this context: the shard resumes from it and is saved into it.
        Raises:
            RuntimeError: on a worker rank.
            PSProtocolError / CommError: sync mode lost a worker or got a bad message.
        """
        if not self.is_server:
            raise RuntimeError("ps.serve() on a worker rank; check ps.is_server first")
        self._check_checkpoint(checkpoint)
        resumed = checkpoint.resumed if checkpoint is not None else None
        return self.architecture.serve(
            model, optimizer_factory(optimizer),
            save=checkpoint.save_rank_state if checkpoint is not None else None,
            restored=resumed.rank_state if resumed is not None else None)

    # --- workers ------------------------------------------------------------------------------

    def DistributedOptimizer(self, optimizer: torch.optim.Optimizer,  # noqa: N802 - Horovod's
                             model: nn.Module, checkpoint=None) -> "DistributedOptimizer":
        """Train ``model`` through the servers: its gradients are pushed from backward's
        hooks, and the returned optimizer's ``step()`` pulls the servers' parameters into
        it. Blocks until the servers serve (it pulls their initial values).

        Args:
            optimizer: the script's optimizer of ``model`` (the servers use its class and
                hyper-parameters; it never steps here).
            checkpoint: a started :class:`gradsync.checkpoint.Checkpointer` with ``arch=``
                this context: training continues at the step it resumed, and it saves this
                optimizer (whose state is on the servers).
        Raises:
            RuntimeError: on a server rank. ValueError: an optimizer the servers cannot
                rebuild (see :func:`optimizer_factory`).
        """
        if not self.is_worker:
            raise RuntimeError("ps.DistributedOptimizer() on a server rank; check "
                               "ps.is_server first")
        optimizer_factory(optimizer)  # refused here too, not only on the servers
        self._check_checkpoint(checkpoint)
        start = checkpoint.position.step if checkpoint is not None else 0
        _, remote = self.architecture.prepare(model, None, start_step=start)
        wrapped = DistributedOptimizer(remote.worker, optimizer)
        if checkpoint is not None:
            checkpoint.optimizer = wrapped
        return wrapped

    def shutdown(self) -> dict[str, Any]:
        """On a worker after its last step: tell the servers it is done; returns the
        Parameter Server's figures (those of `gradsync train`'s summary). Idempotent; {} on
        a server."""
        if self.is_worker and self._summary is None and self.architecture.worker is not None:
            self._summary = self.architecture.finish()
        return self._summary or {}

    def __enter__(self) -> "PSContext":
        return self

    def __exit__(self, kind, *exc: object) -> None:
        if kind is None:  # after an error the servers see this worker leave instead
            self.shutdown()

    # --- what a Checkpointer asks (checkpoint/protocol.py) ------------------------------------

    @property
    def group(self) -> comm.Group:
        return self.architecture.group

    @property
    def committer(self) -> int:
        return self.architecture.committer

    @property
    def checkpoint_tag(self) -> str:
        return self.architecture.checkpoint_tag

    replicated = False

    def commit_checkpoint(self, step: int, commit: Callable[[], None], written: bool = True
                          ) -> None:
        if self.architecture.worker is None:
            raise RuntimeError("checkpoint saved before ps.DistributedOptimizer(..., "
                               "checkpoint=ckpt): the servers cannot be asked to save")
        self.architecture.commit_checkpoint(step, commit, written)

    def _check_checkpoint(self, checkpoint) -> None:
        if checkpoint is not None and checkpoint.architecture is not self:
            raise ValueError("the Checkpointer passed was not made with arch= this context")


class DistributedOptimizer(RemoteOptimizer):
    """A worker's optimizer: ``zero_grad()`` clears the gradients, ``step()`` waits for the
    servers' replies to this step's pushes and loads the fresh parameters. Its state lives
    on the servers (``state_dict()`` is empty). ``param_groups`` are the script optimizer's,
    for reading: the servers' hyper-parameters were fixed when they started."""

    def __init__(self, worker, optimizer: torch.optim.Optimizer):
        super().__init__(worker)
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


def optimizer_factory(optimizer: torch.optim.Optimizer
                      ) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """What a server builds for each partition it holds: ``optimizer``'s class with its
    hyper-parameters (the optimizers are elementwise, so per partition is the same update).

    Raises:
        ValueError: ``optimizer`` has several parameter groups (their hyper-parameters
            would differ across a partition).
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"the parameter servers rebuild the optimizer for every partition "
                         f"of their shards: it needs one parameter group, not "
                         f"{len(optimizer.param_groups)}")
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    # param_groups also hold what a scheduler adds (initial_lr): not the constructor's
    hyper = {k: v for k, v in optimizer.param_groups[0].items()
             if k != "params" and k in accepted}
    return lambda params: cls(params, **hyper)
