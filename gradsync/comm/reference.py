"""The engine's own data parallelism, as a baseline to measure gradsync against.

Only this package may import torch.distributed, so the benchmarks reach
``torch.nn.parallel.DistributedDataParallel`` through here.
"""

from __future__ import annotations

from torch import nn

from .group import Group, resolve


def torch_ddp(module: nn.Module, group: Group | None = None,
              bucket_cap_mb: float = 25.0) -> nn.Module:
    """Wrap ``module`` in torch's DistributedDataParallel over ``group``'s process group."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, process_group=resolve(group).pg,
                                   bucket_cap_mb=bucket_cap_mb)
