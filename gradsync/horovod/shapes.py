"""The shape exchange before a collective whose ranks may hold different shapes.

allgather, alltoall and reducescatter first all-gather a fixed-layout header per rank,
``[ok, ndim, dtype code, d0, ..., d7]`` (int64, 11 values), and check it the same way on
every rank: a mismatch (or a rank whose own arguments were wrong, ``ok = 0``) is then one
clear ValueError on every rank, instead of a hang or garbage in the padded gather after it.
"""

from __future__ import annotations

import torch

from .. import comm

MAX_DIMS = 8
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
          torch.complex128)


def split_rows(n: int, parts: int) -> list[int]:
    """``n`` rows over ``parts`` ranks: ``n // parts`` each, one more for the first
    ``n % parts`` (Horovod's reducescatter)."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def _header(tensor: torch.Tensor, ok: bool) -> torch.Tensor:
    header = torch.full((3 + MAX_DIMS,), -1, dtype=torch.int64)
    fits = tensor.dtype in DTYPES and 1 <= tensor.dim() <= MAX_DIMS
    header[0] = int(ok and fits)
    header[1] = tensor.dim()
    header[2] = DTYPES.index(tensor.dtype) if tensor.dtype in DTYPES else -1
    shape = list(tensor.shape)[:MAX_DIMS]
    header[3:3 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    return header


def exchange_shapes(group: comm.Group, tensor: torch.Tensor, what: str, name: str | None,
                    same_first: bool, ok: bool = True, why: str = "") -> list[list[int]]:
    """Every member's shape (collective), checked alike on every rank.

    Args:
        same_first: dim 0 must agree too (reducescatter), not only the others.
        ok: this rank's own arguments are valid; ``why`` says what they must be.
    Raises:
        ValueError: on every rank, naming the ranks and their shapes or arguments.
    """
    mine = _header(tensor, ok)
    rows = comm.all_gather([torch.empty_like(mine) for _ in range(group.size)], mine,
                           group=group)
    label = f"{what}{f' {name!r}' if name else ''}"
    bad = [r for r, h in enumerate(rows) if h[0] != 1]
    if bad:
        raise ValueError(f"{label}: ranks {[group.ranks[r] for r in bad]} passed invalid "
                         f"arguments ({why or f'a tensor of 1 to {MAX_DIMS} dims'})")
    described = [_describe(h) for h in rows]
    keys = [(int(h[1]), int(h[2]), tuple(h[3 if same_first else 4:].tolist())) for h in rows]
    if len(set(keys)) > 1:
        table = "; ".join(f"rank {group.ranks[r]}: {d}" for r, d in enumerate(described))
        must = "shapes and dtypes" if same_first else "dtypes and all dims but the first"
        raise ValueError(f"{label}: the ranks' tensors differ ({must} must agree): {table}")
    return [[int(d) for d in h[3:3 + int(h[1])]] for h in rows]


def _describe(header: torch.Tensor) -> str:
    ndim, code = int(header[1]), int(header[2])
    dtype = str(DTYPES[code]).replace("torch.", "") if code >= 0 else "?"
    return f"{dtype}{[int(d) for d in header[3:3 + min(ndim, MAX_DIMS)]]}"
