"""Horovod's PyTorch API on gradsync: ``import gradsync.horovod as hvd`` in place of
``import horovod.torch as hvd``. Every call maps onto gradsync's own pieces (comm's
collectives and groups, the gradient buckets, the compression hooks); docs/horovod.md lists
what maps to what and what differs (objects never pickled, no Adasum, join).

    basics        init, size/rank queries from the hosts' topology, ops, ProcessSet
    compression   Horovod's compress/decompress contract over gradsync's compressors
    shapes        the header exchange that makes mismatched shapes one error on every rank
    collectives   allreduce, allgather, broadcast, handles
    exchange      alltoall, reducescatter
    join          join (uneven data: joined ranks contribute zeros), barrier
    objects       objects as JSON plus raw tensors; parameters and optimizer state
    optimizer     DistributedOptimizer on gradsync's buckets, overlapped with backward
    elastic       hvd.elastic: run, TorchState, ElasticSampler on gradsync.elastic

Launch: ``gradsync run -np N script.py`` (horovodrun's flags; or torchrun's), torchrun, or
``mpiexec -n N python script.py``.
"""

from .basics import (ADASUM_ERROR, Adasum, Average, Max, Min, ProcessSet, Product, Sum,
                     add_process_set, ccl_built, cross_rank, cross_size, cuda_built,
                     ddl_built, global_process_set, gloo_built, gloo_enabled, init,
                     is_homogeneous, is_initialized, local_rank, local_size, mpi_built,
                     mpi_enabled, mpi_threads_supported, nccl_built, rank,
                     remove_process_set, rocm_built, shutdown, size)
from .collectives import (Handle, allgather, allgather_async, allreduce, allreduce_,
                          allreduce_async, allreduce_async_, broadcast, broadcast_,
                          broadcast_async, broadcast_async_, grouped_allreduce,
                          grouped_allreduce_, grouped_allreduce_async,
                          grouped_allreduce_async_, poll, synchronize)
from . import elastic
from .compression import Compression
from .exchange import alltoall, alltoall_async, reducescatter, reducescatter_async
from .join import barrier, join
from .objects import (allgather_object, broadcast_object, broadcast_optimizer_state,
                      broadcast_parameters)
from .optimizer import DistributedOptimizer

__all__ = [
    "ADASUM_ERROR", "Adasum", "Average", "Compression", "DistributedOptimizer", "Handle",
    "Max", "Min", "ProcessSet", "Product", "Sum", "add_process_set", "allgather",
    "allgather_async", "allgather_object", "allreduce", "allreduce_", "allreduce_async",
    "allreduce_async_", "alltoall", "alltoall_async", "barrier", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_optimizer_state",
    "broadcast_parameters", "ccl_built", "elastic", "cross_rank", "cross_size", "cuda_built",
    "ddl_built", "global_process_set", "gloo_built", "gloo_enabled", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "init",
    "is_homogeneous", "is_initialized", "join", "local_rank", "local_size", "mpi_built",
    "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank", "reducescatter",
    "reducescatter_async", "remove_process_set", "rocm_built", "shutdown", "size",
    "synchronize",
]
