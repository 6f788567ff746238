"""The simplest correct data parallelism: after backward, average each gradient on its own.

One blocking all-reduce per parameter and no overlap with backward. It is the oracle the
bucketed :class:`~gradsync.allreduce.DataParallel` is tested against, and a readable
statement of what data parallelism has to do.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import comm


class DataParallelNaive(nn.Module):
    """Wrap ``module``; call :meth:`sync_gradients` between ``backward()`` and ``step()``."""

    def __init__(self, module: nn.Module, group: comm.Group | None = None,
                 algorithm: str = "native"):
        super().__init__()
        self.module = module
        self.group = group
        self.algorithm = algorithm
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                comm.broadcast(tensor.data, src=0, group=group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync_gradients(self) -> None:
        for param in self.module.parameters():
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                comm.all_reduce(param.grad, op="avg", group=self.group,
                                algorithm=self.algorithm)
