"""gradsync: data-parallel training for PyTorch on torch.distributed.

    import gradsync
    model = gradsync.DataParallel(model)      # All-Reduce architecture
    sampler = gradsync.data.ShardedSampler(dataset)
"""

from . import comm
from .allreduce import DataParallel, DataParallelNaive

__version__ = "0.1.0"

__all__ = ["DataParallel", "DataParallelNaive", "comm", "__version__"]
