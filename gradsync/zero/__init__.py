"""Sharded data parallelism (ZeRO, Rajbhandari et al. 2020): each of N ranks keeps only
1/N of the optimizer state (stage 1), also of the gradients (stage 2) and also of the
parameters between uses (stage 3).

    model = gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=2, lr=1e-3)
    opt = model.optimizer                     # steps this rank's shard, then all-gathers
    loss_fn(model(x), y).backward()           # gradients reduce-scattered during backward
    opt.step()
    opt.zero_grad()

Why one wrapper that owns the optimizer, rather than DDP plus a sharded optimizer: from
stage 2 on, gradients no longer live in ``param.grad`` but in this rank's piece of each
bucket, and parameters live in flat padded buckets, so the module wrapper and the
optimizer share one layout and cannot be built apart. The name pairs with DDP's
(DistributedDataParallel) and FSDP's; the constructor takes ``optimizer_class, **defaults``
as torch's ``ZeroRedundancyOptimizer`` does, so stage 1 replaces DDP plus that optimizer.

    layout     flat padded buckets, one piece per rank (balanced by bytes, per dtype)
    optimizer  ShardedOptimizer: the torch optimizer over the pieces; all-gather after step
    sharded    ShardedDataParallel: hooks, all-reduce (1) or reduce-scatter (2, 3), no_sync
    stage3     ParameterGatherer: per-layer all-gather before forward and backward, free after
    checkpoint save_sharded / load_sharded (re-sharding), full_state_dict for a plain model
"""

from .checkpoint import full_state_dict
from .layout import ShardedBucket, shard_parameters
from .optimizer import ShardedOptimizer
from .sharded import STAGES, ShardedDataParallel

__all__ = ["STAGES", "ShardedBucket", "ShardedDataParallel", "ShardedOptimizer",
           "full_state_dict", "shard_parameters"]
