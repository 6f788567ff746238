"""gradsync: data-parallel training for PyTorch on torch.distributed.

    import gradsync
    model = gradsync.DataParallel(model)      # All-Reduce architecture
    model = gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=2)   # ZeRO
    sampler = gradsync.data.ShardedSampler(dataset)

Attributes are imported on first use, so that tools which need no torch (`gradsync lab`,
the launcher) start quickly.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"DataParallel": "gradsync.allreduce", "DataParallelNaive": "gradsync.allreduce",
         "ShardedDataParallel": "gradsync.zero"}
_SUBMODULES = ("comm", "allreduce", "ps", "checkpoint", "data", "models", "train", "lab", "elastic")

__all__ = ["DataParallel", "DataParallelNaive", "ShardedDataParallel", "__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"gradsync.{name}")
    raise AttributeError(f"module 'gradsync' has no attribute {name!r}")
