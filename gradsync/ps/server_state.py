"""A parameter server's checkpoint state: its shard, the partitions' optimizer states, their
versions and the workers' step (:meth:`ParameterServer.state_dict` and ``load_state_dict``).

Split from ``server.py`` to keep that module on serving. A checkpoint written before shards
were cut into partitions (one flat shard, one optimizer state) loads into a run whose shard is
one partition.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def shard_state(server) -> dict[str, Any]:
    """The shard (numel,) when it has one dtype, else its partitions ("parts"), the
    partitions' optimizer states, their versions and the workers' step; a copy, which later
    updates leave alone."""
    values = [p.detach().clone() for p in server.params]
    state = ({"shard": torch.cat(values)} if len({v.dtype for v in values}) == 1
             else {"parts": values})
    optimizers = [copy.deepcopy(o.state_dict()) for o in server.optimizers]
    # one partition: the optimizer's own state dict, as a checkpoint held before partitions
    return {**state, "optimizer": optimizers[0] if len(optimizers) == 1 else optimizers,
            "versions": list(server.versions), "version": server.version, "step": server.step}


def load_shard_state(server, state: dict[str, Any]) -> None:
    """Continue from ``shard_state()`` of a checkpoint (same shard layout and partitions)."""
    parts = state.get("parts")
    if parts is None:  # one dtype: the shard, cut as this run cuts it
        sizes = [p.numel() for p in server.params]
        shard = state["shard"]
        parts = list(shard.split(sizes)) if shard.numel() == sum(sizes) else [shard]
    have = [(tuple(p.shape), p.dtype) for p in server.params]
    got = [(tuple(p.shape), p.dtype) for p in parts]
    optimizers = state["optimizer"]
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    if have != got or len(optimizers) != len(have):
        raise ValueError(f"server {server.index}: the checkpoint's partitions are {got}, "
                         f"this run's {have} (--ps-partition-mb, the links and the workers on "
                         "other hosts decide them; resume with the same)")
    with torch.no_grad():
        for p, t in zip(server.params, parts):
            p.copy_(t)
    for o, s in zip(server.optimizers, optimizers):
        o.load_state_dict(s)
    server.versions = [int(v) for v in state.get("versions", [state["version"]] * len(have))]
    server.step = int(state["step"])
