"""One clock for the timelines of all ranks: each rank's offset to rank 0, measured at start-up.

Timeline events are stamped with ``time.perf_counter()`` (monotonic, but its zero differs
from host to host). At start-up the ranks meet a few times in a barrier and, right after
leaving it, all-gather their clock readings; a rank's offset is rank 0's reading minus its
own, the median over the rounds. Its error is how unevenly the ranks leave a barrier (the
engine's wake-up latency, tens to hundreds of microseconds with gloo on one host), which the
spread over the rounds shows; it is recorded in every rank's file.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .. import comm


@dataclass(frozen=True)
class Clock:
    """Maps this rank's ``perf_counter`` readings onto the shared time line (microseconds
    since ``origin_s`` on rank 0's clock)."""

    offset_s: float = 0.0   # add to a local reading to get rank 0's reading
    origin_s: float = 0.0   # rank 0's reading at alignment: time zero of the trace
    spread_s: float = 0.0   # max - min of the offset over the rounds: its uncertainty
    rounds: int = 0         # 0: not aligned (one process)

    def us(self, t: float) -> float:
        """Local ``perf_counter`` seconds ``t`` as trace microseconds."""
        return (t + self.offset_s - self.origin_s) * 1e6

    @classmethod
    def local(cls) -> "Clock":
        """A process alone: time zero is now."""
        return cls(origin_s=time.perf_counter())


def align_clocks(group: "comm.Group", rounds: int = 5) -> Clock:
    """Measure this rank's clock offset to rank 0 of ``group`` (collective, every rank)."""
    if group.size == 1:
        return Clock.local()
    offsets, origin = [], 0.0
    for _ in range(rounds):
        comm.barrier(group)
        now = torch.tensor([time.perf_counter()], dtype=torch.float64)
        readings = [torch.empty_like(now) for _ in range(group.size)]
        comm.all_gather(readings, now, group=group, algorithm="native")
        origin = readings[0].item()
        offsets.append(origin - now.item())
    return Clock(offset_s=statistics.median(offsets), origin_s=origin,
                 spread_s=max(offsets) - min(offsets), rounds=rounds)
