"""DataParallel whose all-reduce is chosen by the planner (`gradsync plan`'s model): the
algorithm, the compressor and the bucket size with the best predicted step for this model
on this group's hosts and links.

    model = auto_data_parallel(model, sample=(x, y), loss_fn=F.cross_entropy)
    # rank 0 logs: DataParallel(strategy="auto") chose allreduce shm (0.88 ms/step
    #   predicted, bottleneck: memory copies); runner-up allreduce native (1.27 ms/step); ...

It is ``DataParallel(model, algorithm=..., bucket_cap_mb=...)`` with the chosen compressor's
hook registered, exactly as the script would have written it by hand. Every rank must call
it (it is collective). Rank 0 alone measures a copy of the model on ``sample`` (one thread:
forward, backward, when each gradient is ready, what each compressor costs), describes the
cluster from the group's topology (probed as DataParallel probes it), and plans; its choice
crosses to the other ranks as one float64 tensor of fixed layout (:class:`Strategy`), so
all ranks build the same DataParallel whatever their own timings would have said.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .. import comm
from ..comm.algorithms.registry import ALGORITHMS
from ..compress.spec import REGISTRY as COMPRESSORS
from ..compress.spec import make_hook, parse
from .bucket_reduce import attach_topology
from .data_parallel import DataParallel

log = logging.getLogger(__name__)

PROFILE_STEPS = 6  # as gradsync train --arch auto: a second or a few at start-up
FAILED = -1.0


@dataclass(frozen=True)
class Strategy:
    """What DataParallel runs: the all-reduce algorithm, the compressor (as
    ``--compression`` spells it), the bucket size, and the predicted step times."""

    algorithm: str
    compression: str = "none"
    bucket_cap_mb: float = 25.0
    predicted_ms: float = math.nan
    runner_up_ms: float = math.nan

    def encode(self) -> torch.Tensor:
        """(7,) float64: [1, algorithm index, compressor index, its argument (0: none),
        bucket MiB, predicted ms, runner-up ms] (indices into the algorithm and compressor
        tables, which every rank holds alike)."""
        spec = parse(self.compression)
        return torch.tensor([1.0, ALGORITHMS.index(self.algorithm),
                             list(COMPRESSORS).index(spec.name), spec.arg or 0.0,
                             self.bucket_cap_mb, self.predicted_ms, self.runner_up_ms],
                            dtype=torch.float64)

    @classmethod
    def decode(cls, header: torch.Tensor) -> "Strategy":
        status, algo, codec, arg, bucket_mb, predicted, runner_up = header.tolist()
        name = list(COMPRESSORS)[int(codec)]
        spec = name if COMPRESSORS[name].arg is None else f"{name}:{arg:g}"
        return cls(ALGORITHMS[int(algo)], str(parse(spec)), bucket_mb, predicted, runner_up)


def auto_data_parallel(module: torch.nn.Module, sample: tuple, loss_fn, *,
                       group: comm.Group | None = None, cluster=None,
                       compression: str | None = None, topology="probe",
                       **kwargs) -> DataParallel:
    """``DataParallel(module, ...)`` with the planner's algorithm, compressor and bucket size.

    Args:
        module: the model, as for DataParallel.
        sample: one batch of this rank's, (inputs, targets), to time the model on.
        loss_fn: ``loss_fn(module(inputs), targets)``.
        group: the ranks to average over (default: all). Compressors are timed on a
            one-rank group made from the world, so with a sub-group only uncompressed
            configurations are planned.
        cluster: a :class:`gradsync.plan.Cluster` to plan for instead of the group's hosts
            (e.g. ``Cluster.parse(3, rates=..., shared=True)`` for the lab, whose hosts
            share this machine's cores).
        compression: only this compressor ("none": uncompressed); None: any.
        topology, kwargs: DataParallel's other arguments (not ``algorithm`` or
            ``bucket_cap_mb``, which are the plan's).
    Returns:
        The DataParallel, its hook registered.
    Raises:
        ValueError: ``algorithm`` or ``bucket_cap_mb`` given; RuntimeError: rank 0 could
            not plan (on every rank, naming the reason on rank 0).
    """
    if "algorithm" in kwargs or "bucket_cap_mb" in kwargs:
        raise ValueError("auto_data_parallel chooses algorithm and bucket_cap_mb itself; "
                         "pass them to DataParallel instead")
    group = group if group is not None else (
        comm.world() if comm.is_initialized() else comm.init_process_group())
    attach_topology(group, topology)  # the probe DataParallel would run, done first
    strategy = plan_strategy(module, sample, loss_fn, group, cluster, compression)
    model = DataParallel(module, group=group, algorithm=strategy.algorithm,
                         bucket_cap_mb=strategy.bucket_cap_mb, topology=None, **kwargs)
    hook = make_hook(strategy.compression, group, algorithm=strategy.algorithm)
    if hook is not None:
        model.register_comm_hook(*hook)
    model.strategy = strategy
    return model


def plan_strategy(module, sample, loss_fn, group: comm.Group, cluster=None,
                  compression: str | None = None) -> Strategy:
    """Rank 0's plan, broadcast to every rank of ``group`` (collective)."""
    whole = group.size == comm.world().size
    solo = comm.new_group([group.ranks[0]]) if whole else None  # every world rank calls it
    header, error = torch.full((7,), FAILED, dtype=torch.float64), None
    if group.rank == 0:
        try:
            header = _plan(module, sample, loss_fn, group, cluster,
                           compression if whole else "none", solo).encode()
        except Exception as exc:  # every rank must hear of it, not wait for a header
            error = exc
    comm.broadcast(header, src=0, group=group)
    if error is not None:
        raise RuntimeError(f"DataParallel(strategy='auto') could not plan: {error}") from error
    if header[0] == FAILED:
        raise RuntimeError("DataParallel(strategy='auto'): rank 0 could not plan (its log "
                           "says why)")
    return Strategy.decode(header)


def _plan(module, sample, loss_fn, group: comm.Group, cluster, compression, solo) -> Strategy:
    from ..plan import choose
    from ..plan.profile import CODECS, measure_module

    specs = () if compression == "none" else (compression,) if compression else CODECS
    profile = measure_module(module, sample, loss_fn, steps=PROFILE_STEPS, specs=specs,
                             group=solo)
    cluster = cluster or cluster_of(group)
    choice = choose(profile, cluster, arch="allreduce", compression=compression)
    log.info("%s", choice.line('DataParallel(strategy="auto")'))
    best, second = choice.best, choice.runner_up
    return Strategy(best.candidate.algorithm, best.candidate.compression,
                    best.candidate.bucket_mb, 1e3 * best.step_s,
                    1e3 * second.step_s if second else math.nan)


def cluster_of(group: comm.Group):
    """The plan's Cluster for ``group``: its measured hosts and links, or one host (whose
    ranks share this machine's cores)."""
    from ..plan import Cluster

    topology = group.topology
    if topology is None or len(topology.hosts) == 1:
        return Cluster.parse(1, group.size, shared=True)
    return Cluster.from_topology(topology)
