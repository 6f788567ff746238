"""How DataParallel averages a full bucket: the topology its ``auto`` reads, the all-reduce
each bucket runs, buckets in shared memory on one host, and a comm hook in place of the
all-reduce.

Set-up and plumbing of :class:`gradsync.allreduce.DataParallel`, apart from the per-step
bookkeeping of its backward hooks (``data_parallel.py``).
"""

from __future__ import annotations

import logging
import time

from .. import comm
from ..compress.bucket import GradBucket, result_tensor
from .buckets import Bucket

# DataParallel's own logger: the topology line belongs to its log.
log = logging.getLogger("gradsync.allreduce.data_parallel")


def attach_topology(group: comm.Group, topology) -> None:
    """Give ``group`` the topology DataParallel was asked for (collective)."""
    known = group.topology
    if topology is None or (topology == "probe" and known is not None
                            and (known.measured or len(known.hosts) == 1)):
        return  # measured already (start-up only tells the hosts apart)
    if topology == "probe":
        topology = comm.probe_topology(group)
    elif not isinstance(topology, comm.Topology):
        topology = comm.Topology.load(topology)
    comm.set_topology(topology, group)
    if topology.measured:
        log.info("topology: %d hosts\n%s", len(topology.hosts), topology.describe())


def bucket_algorithms(buckets: list[Bucket], algorithm: str, group: comm.Group) -> list[str]:
    """The all-reduce algorithm of each bucket, in launch order, for ``algorithm``."""
    # gradsync's own algorithms drive every message from Python and so compete with
    # backward for the GIL; measured on synthetic-mlp, the engine's ring trains fastest
    # (tree 0.94x, ring 0.81x of it; docs/benchmarks.md). "auto" therefore means the
    # engine for gradient buckets, unless the topology calls for shm, aware or
    # hierarchical: then the cost model's choice for each bucket's size, fixed here so
    # that every step runs (and reports) the same algorithms.
    by_model = algorithm == "auto" and comm.network_candidates(group.topology)
    return [
        comm.DEFAULT_COST_MODEL.choose(b.flat.numel() * b.flat.element_size(), group.size,
                                       topology=group.topology) if by_model
        else "native" if algorithm == "auto" else algorithm
        for b in buckets]


def share_buckets(buckets: list[Bucket], algorithms: list[str],
                  group: comm.Group) -> "comm.SharedBuckets | None":
    """On one host (every bucket on ``shm``) the buckets move into shared memory: the
    gradient copy into a bucket is then the copy into this rank's slot, and the
    all-reduce leaves the result there (comm/shared_buckets.py), two copies of every
    gradient fewer per step. None: the buckets stay where they are."""
    if group.size == 1 or any(a != "shm" for a in algorithms):
        return None
    shared = comm.SharedBuckets([(b.flat.numel(), b.flat.dtype) for b in buckets], group)
    for b, bucket in enumerate(buckets):
        bucket.flat = shared.buffer(b)
    return shared


def hook_work(hook, state, bucket: Bucket, buckets: int, group: comm.Group) -> comm.Work:
    """Start ``hook(state, ...)`` on ``bucket`` (one of ``buckets``); the handle's ``wait()``
    leaves the average in it."""
    view = GradBucket(bucket.index, bucket.flat, bucket.params, bucket.offsets,
                      bucket.index == buckets - 1, group)
    handle = hook(state, view)

    def finish():
        result = result_tensor(handle.wait())
        if result.data_ptr() != bucket.flat.data_ptr():
            bucket.flat.copy_(result.view(-1))
        return bucket.flat

    return comm.Work(finish)


class BucketTrace:
    """The timeline spans of a step's bucket collectives (``--timeline``): launch to the
    moment their completion was observed. gradsync cannot see the engine finish a
    collective, so completion is the first of: a later bucket's launch that finds it done,
    or its ``wait()`` returning; an upper bound, tight while backward keeps launching."""

    def __init__(self, timeline, buckets: list[Bucket], algorithms: list[str]):
        self.timeline = timeline
        self.bytes = [b.flat.numel() * b.flat.element_size() for b in buckets]
        self.algorithms = algorithms
        for b, algorithm in enumerate(algorithms):
            timeline.name_row(100 + b, f"bucket {b} ({algorithm}, {self.bytes[b] / 1e6:.2f} MB)")
        self._spans: list[list] = []  # [work, launch, end or None] in launch order
        self._hooks: list[tuple[float, float, int]] = []  # (start, end, bucket) hook calls

    def launched(self, work: comm.Work, start: float, hooked: bool = False) -> None:
        """The next bucket's collective was started at ``start`` (stamped before the call:
        an algorithm may do its work inside it); ``hooked``: by a comm hook, whose call (a
        compressor's encoding and the launch of its collectives, inside backward) becomes a
        span of its own on the compute row."""
        now = time.perf_counter()
        if hooked:
            self._hooks.append((start, now, len(self._spans)))
        for span in self._spans:
            if span[2] is None and span[0].is_completed():
                span[2] = now
        self._spans.append([work, start, None])

    def completed(self, k: int) -> None:
        """Bucket ``k``'s ``wait()`` returned."""
        if self._spans[k][2] is None:
            self._spans[k][2] = time.perf_counter()

    def finish_step(self, wait_start: float, wait_end: float) -> None:
        """Record the wait at the end of backward and the step's collectives."""
        tl = self.timeline
        tl.record("wait for communication", wait_start, wait_end)
        for start, end, b in self._hooks:
            tl.record("comm hook (compress)", start, end, bucket=b)
        self._hooks = []
        for b, (_, start, end) in enumerate(self._spans):
            tl.record("all-reduce", start, end if end is not None else wait_end, tid=100 + b,
                      bucket=b, algorithm=self.algorithms[b], bytes=self.bytes[b])
        self._spans = []
