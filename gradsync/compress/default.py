"""The default hook: average the bucket with one all-reduce (what DataParallel does without
a hook), and the state every hook of this package keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import comm
from .bucket import GradBucket, HookStats, bus_bytes


@dataclass
class HookState:
    """The group a hook averages over, the all-reduce algorithm it uses, and its stats."""

    group: comm.Group | None = None
    algorithm: str = "auto"
    stats: HookStats = field(default_factory=HookStats)

    def resolve(self, bucket: GradBucket) -> comm.Group:
        return self.group if self.group is not None else bucket.group


def allreduce_hook(state: HookState, bucket: GradBucket) -> comm.Work:
    """Average ``bucket`` in place: divide by the world size, then sum across ranks."""
    group = state.resolve(bucket)
    buf = bucket.buffer()
    buf.div_(group.size)
    nbytes = buf.numel() * buf.element_size()
    state.stats.buckets += 1
    state.stats.bytes_sent += bus_bytes(nbytes, group.size)
    state.stats.bytes_dense += bus_bytes(nbytes, group.size)
    return comm.all_reduce_async(buf, op="sum", group=group, algorithm=state.algorithm)
