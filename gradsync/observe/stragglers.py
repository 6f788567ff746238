"""Stragglers named: which worker computes persistently slower than the others, and how long
the others waited for it (pytorch RFC 71303: "DDP is highly sensitive to stragglers").

A step's compute time on a rank is its step time less its wait for communication at the
end of backward. In a synchronous step every rank waits for the last one to finish
computing, so the rank with the largest compute time of a step makes each other rank wait
the difference; summed over the run, that is the time the others waited for it.

The rule: a rank is a straggler over a window of steps when its compute time summed over
the window, less its slowest tenth of steps (at least one: a page fault, a preemption on a
shared core), exceeds ``ratio`` times the median of the ranks' such sums. A sum, not a count
of slow steps: a host capped by a CPU quota (docker's ``--cpus``, cgroup ``cpu.max``) runs
at full speed until its quota of a 100 ms period is spent and then not at all, so it is
slow in bursts, a few steps in a window, each by a large factor; what the others wait is
the excess of the sum either way. For an even count of ranks the median
is the lower middle value (torch's), so with 2 workers the slower is compared with the
faster. The trainer checks it every
``--straggler-window`` steps with one all-gather of the window's times, and rank 0 logs a
warning naming the rank and its factor.
"""

from __future__ import annotations

import logging
import time

import torch

from .. import comm

log = logging.getLogger("gradsync.observe")
TRIM = 0.1   # share of a window's steps, each rank's slowest, left out of its sum


def find_stragglers(compute: torch.Tensor, ratio: float = 1.2) -> list[tuple[int, float]]:
    """Ranks whose compute summed over the steps, less their slowest TRIM of steps, exceeds
    ``ratio`` x the median rank's.

    Args:
        compute: (ranks, steps) compute seconds.
    Returns:
        (rank, factor) pairs, factor the rank's trimmed sum / the median of the trimmed sums.
    """
    ranks, steps = compute.shape
    if ranks < 2 or steps == 0:
        return []
    keep = steps - max(1, round(TRIM * steps)) if steps > 1 else 1
    trimmed = compute.sort(dim=1).values[:, :keep].sum(dim=1)              # (ranks,)
    factor = trimmed / trimmed.median().clamp_min(1e-12)                  # (ranks,)
    return [(r, factor[r].item()) for r in range(ranks) if factor[r].item() > ratio]


def waited_for(compute: torch.Tensor) -> list[float]:
    """Per rank: seconds the other ranks spent, on average, waiting for it to finish
    computing, over the steps in which it was the last (``compute``: (ranks, steps))."""
    ranks = compute.shape[0]
    if ranks < 2:
        return [0.0] * ranks
    last = compute.argmax(dim=0)                                        # (steps,)
    lost = (compute.max(dim=0).values - compute).sum(dim=0) / (ranks - 1)  # (steps,)
    return [lost[last == r].sum().item() for r in range(ranks)]


class StragglerWatch:
    """Every rank's compute time per step; every ``window`` steps, the warning on rank 0
    (collective on ``group``: each worker calls :meth:`step` at every step)."""

    def __init__(self, group: "comm.Group", window: int, ratio: float = 1.2):
        self.group, self.window, self.ratio = group, window, ratio
        self.compute: list[float] = []
        self.step_s: list[float] = []
        self._span: list[float] = []  # perf_counter at the first step's start, at the last's end
        self._wait_before = 0.0
        self._named: set[int] = set()

    def step(self, record: dict) -> None:
        """One step's record (metrics.jsonl's: ``comm_wait_s`` counts from the loop start)."""
        wait = record.get("comm_wait_s", 0.0) - self._wait_before
        self._wait_before = record.get("comm_wait_s", 0.0)
        self.compute.append(max(record["step_time_s"] - max(wait, 0.0), 0.0))
        self.step_s.append(record["step_time_s"])
        now = time.perf_counter()
        self._span = [self._span[0] if self._span else now - record["step_time_s"], now]
        if len(self.compute) % self.window == 0:
            self._check(record["step"])

    def _gather(self, times: list[float]) -> torch.Tensor:
        mine = torch.tensor(times, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.group.size)]
        comm.all_gather(rows, mine, group=self.group, algorithm="native")
        return torch.stack(rows)                                        # (ranks, steps)

    def _check(self, step: int) -> None:
        found = find_stragglers(self._gather(self.compute[-self.window:]), self.ratio)
        named = {r for r, _ in found}
        if self.group.rank == 0 and named != self._named:
            for r, factor in found:
                log.warning("straggler: worker %d computed %.2fx the median of the workers "
                            "in steps %d-%d", r, factor, step - self.window + 1, step)
            if not found:
                log.warning("no straggler in steps %d-%d", step - self.window + 1, step)
        self._named = named

    def report(self) -> dict:
        """The summary's figures over the whole run (collective), the same on every rank."""
        compute = self._gather(self.compute)
        # Per worker, the time in its steps (compute plus waiting on communication) and its
        # loop's wall time (first step's start to last step's end): the plots split them.
        span = self._span[1] - self._span[0] if self._span else 0.0
        times = self._gather([sum(self.step_s), span])                 # (ranks, 2)
        return {"compute_s_per_worker": compute.sum(dim=1).tolist(),
                "step_s_per_worker": times[:, 0].tolist(),
                "wall_s_per_worker": times[:, 1].tolist(),
                "waited_for_s_per_worker": waited_for(compute),
                "stragglers": [{"worker": r, "factor": f}
                               for r, f in find_stragglers(compute, self.ratio)]}
