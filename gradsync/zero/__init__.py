"""Sharded data parallelism (ZeRO, Rajbhandari et al. 2020): each of N ranks keeps only
1/N of the optimizer state (stage 1) and also of the gradients (stage 2).

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
    sharded    ShardedDataParallel: hooks, all-reduce (1) or reduce-scatter (2), no_sync
"""

from .layout import ShardedBucket, shard_parameters
from .optimizer import ShardedOptimizer
from .sharded import STAGES, ShardedDataParallel

__all__ = ["STAGES", "ShardedBucket", "ShardedDataParallel", "ShardedOptimizer",
           "shard_parameters"]
