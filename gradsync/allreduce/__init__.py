"""The All-Reduce architecture: every process is a worker; gradients are averaged with
collectives while backward runs."""

from .buckets import Bucket, assign_buckets, build_buckets
from .data_parallel import DataParallel, DataParallelStats
from .naive import DataParallelNaive
from .nonfinite import NonFiniteGradientError

__all__ = ["Bucket", "DataParallel", "DataParallelNaive", "DataParallelStats",
           "NonFiniteGradientError", "assign_buckets", "build_buckets"]
