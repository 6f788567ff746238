"""NaN and Inf in averaged gradients: found, attributed to the ranks that sent them, and either
stopped on or skipped.

Why the check is exact and agreed without an extra message: an all-reduce sums every rank's
value at each position, and a sum with a NaN or Inf term is NaN or Inf. So the averaged bucket
is non-finite wherever any rank's gradient was, and since every rank holds the same averaged
bytes after the all-reduce, every rank reaches the same verdict. Only on that rare path do
the ranks exchange one flag each (an all_gather) to name who sent it.

Cost on the common path: one finiteness pass over each bucket before it is sent (this rank's
own verdict, kept for naming) and one after the wait.
"""

from __future__ import annotations

import logging

import torch

from .. import comm

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteGradientError(RuntimeError):
    """An averaged gradient holds NaN or Inf; the message names the ranks and the step.

    Every rank of the group raises the same error at the same step.
    """


def find_culprits(group: comm.Group, local_finite: bool) -> list[int]:
    """Collective: the global ranks whose own gradient was not finite (may be empty: the sum
    of finite values overflowed)."""
    mine = torch.tensor([0 if local_finite else 1], dtype=torch.int64)
    flags = [torch.zeros_like(mine) for _ in range(group.size)]
    comm.all_gather(flags, mine, group=group)
    return [group.global_rank(r) for r, f in enumerate(flags) if f.item()]


def describe(culprits: list[int], step: int, params: list[str]) -> str:
    who = (f"rank{'s' if len(culprits) > 1 else ''} {', '.join(map(str, culprits))}"
           if culprits else "no single rank (the sum of finite gradients overflowed)")
    shown = ", ".join(params[:3]) + (f" and {len(params) - 3} more" if len(params) > 3 else "")
    return f"non-finite gradient (NaN or Inf) from {who} at step {step}, in {shown}"
