"""Gradient buckets: which parameters travel together in one all-reduce.

Small tensors are fused into buckets of about ``cap_bytes`` so that each all-reduce carries
enough bytes to amortise its latency, and buckets are filled in reverse registration order,
which is roughly the order backward produces gradients: the first bucket is complete early and
its communication overlaps the rest of backward. The first bucket is kept small (as DDP does,
1 MiB) so that communication starts as soon as possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    """One fused gradient buffer.

    Attributes:
        index: position in launch order.
        params: the parameters whose gradients live in ``flat``.
        offsets: start of each parameter's slice in ``flat``.
        flat: (sum of numels,) buffer the all-reduce runs on.
    """

    index: int
    params: list[torch.nn.Parameter]
    offsets: list[int]
    flat: torch.Tensor
    ready: set[int] = field(default_factory=set)  # indices into params with a gradient

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.flat[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    def is_full(self) -> bool:
        return len(self.ready) == len(self.params)


def assign_buckets(params: list[torch.nn.Parameter], cap_bytes: int,
                   first_cap_bytes: int | None = None) -> list[list[int]]:
    """Group parameter indices into buckets, in reverse order, one dtype per bucket.

    Args:
        params: parameters in registration order.
        cap_bytes: a bucket closes once it holds at least this many bytes.
        first_cap_bytes: cap of the first bucket (default: ``min(cap_bytes, 1 MiB)``).
    Returns:
        Lists of indices into ``params``; every index appears exactly once.
    """
    first_cap = min(cap_bytes, 1 << 20) if first_cap_bytes is None else first_cap_bytes
    buckets: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i in reversed(range(len(params))):
        p = params[i]
        members, size = open_.get(p.dtype, ([], 0))
        members.append(i)
        size += p.numel() * p.element_size()
        cap = first_cap if not buckets else cap_bytes
        if size >= cap:
            buckets.append(members)
            open_.pop(p.dtype, None)
        else:
            open_[p.dtype] = (members, size)
    buckets.extend(members for members, _ in open_.values())
    return buckets


def build_buckets(params: list[torch.nn.Parameter], cap_bytes: int) -> list[Bucket]:
    """Allocate the flat buffers for :func:`assign_buckets`' grouping."""
    out = []
    for index, members in enumerate(assign_buckets(params, cap_bytes)):
        chosen = [params[i] for i in members]
        offsets, total = [], 0
        for p in chosen:
            offsets.append(total)
            total += p.numel()
        flat = torch.zeros(total, dtype=chosen[0].dtype, device=chosen[0].device)
        out.append(Bucket(index, chosen, offsets, flat))
    return out
