"""How DistributedOptimizer fuses gradients: which parameters share a bucket (Horovod's
``groups``, else gradsync's size cap), their names for error messages, and where each bucket's
all-reduce runs (gradsync DataParallel's choice: the engine's ring, or shared memory when
every rank is on one host)."""

from __future__ import annotations

import torch

from .. import comm
from ..allreduce.bucket_reduce import attach_topology, bucket_algorithms, share_buckets
from ..allreduce.buckets import Bucket, assign_buckets
from .shapes import split_rows


def plan_buckets(params: list, groups, cap_bytes: int) -> list[list]:
    """Parameters per bucket, one dtype each: gradsync's size-capped buckets (``groups``
    None), ``groups`` buckets of about equal parameter counts (an int), or the given lists
    (the parameters in none of them in size-capped buckets after).

    Raises:
        ValueError: ``groups`` < 1, or a parameter listed twice.
    """
    if groups is None:
        chosen = [[params[i] for i in m] for m in assign_buckets(params, cap_bytes)]
    elif isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        order, chosen, start = params[::-1], [], 0  # backward's order
        for n in split_rows(len(params), min(groups, len(params))):
            chosen.append(order[start:start + n])
            start += n
    else:
        chosen = [list(g) for g in groups]
        listed = [id(p) for g in chosen for p in g]
        if len(listed) != len(set(listed)):
            raise ValueError("a parameter appears in more than one of groups")
        rest = [p for p in params if id(p) not in set(listed)]
        chosen += [[rest[i] for i in m] for m in assign_buckets(rest, cap_bytes)]
    out = []
    for members in chosen:  # a bucket is one flat tensor: one dtype
        by_dtype: dict[torch.dtype, list] = {}
        for p in members:
            by_dtype.setdefault(p.dtype, []).append(p)
        out.extend(by_dtype.values())
    return [b for b in out if b]


def _bucket(index: int, params: list) -> Bucket:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    return Bucket(index, params, offsets, torch.zeros(total, dtype=params[0].dtype))


def _names(named_parameters, params: list) -> dict[int, str]:
    """Names for error messages; Horovod's checks on ``named_parameters``."""
    if named_parameters is None:
        return {id(p): f"allreduce.noname.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter names in named_parameters must be unique: {names}")
    by_id = {id(p): n for n, p in named}
    if any(id(p) not in by_id for p in params):
        raise ValueError("named_parameters was specified, but one or more model parameters "
                         "were not named: name every parameter the optimizer holds")
    return by_id


def place_buckets(buckets: list[Bucket], group: comm.Group, plain_sum: bool
                  ) -> tuple[list[str], "comm.SharedBuckets | None"]:
    """Each bucket's all-reduce algorithm, and the shared-memory buckets when all of them
    run on ``shm`` (collective: the topology is probed as DataParallel probes it).
    ``plain_sum``: the buckets are summed without a compression hook (shared memory only
    then)."""
    attach_topology(group, "probe")
    algorithms = bucket_algorithms(buckets, "auto", group)
    shared = share_buckets(buckets, algorithms, group) if plain_sum else None
    if not plain_sum:
        algorithms = ["native" if a == "shm" else a for a in algorithms]
    return algorithms, shared
