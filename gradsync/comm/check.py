"""Check mode: agree on what is being called before calling it.

A rank that calls a different collective, or the same one on another shape or dtype, would
make the engine hang or return garbage. In check mode every collective first all-gathers a
fixed-layout int64 header (sequence number, operation, algorithm, reduce op, root, dtype,
shape) and raises :class:`CollectiveMismatchError` with a per-rank table when they differ.
Only integers cross the wire. It costs one small all-gather per call, so it is off by default
(``GRADSYNC_CHECK=1`` or ``check=True`` turns it on); DataParallel's start-up always uses it.
"""

from __future__ import annotations

import torch

from .algorithms.collective_registry import CHOICES
from .errors import CollectiveMismatchError, translate
from .group import Group
from .ops import OPERATIONS

MAX_DIMS = 8
HEADER_LEN = 7 + MAX_DIMS  # seq, op, algorithm, reduce op, root, dtype, ndim, shape...

# Every collective's algorithm names, all-reduce's first (their codes predate the others').
ALGORITHM_CODES = ("", *dict.fromkeys(name for names in CHOICES.values() for name in names))
REDUCE_CODES = ("", "sum", "avg", "max", "min", "prod")
DTYPES = (None, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
          torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
          torch.complex128)


def _code(table: tuple, value) -> int:
    return table.index(value) if value in table else len(table)


def _name(table: tuple, code: int) -> str:
    if 0 <= code < len(table):
        value = table[code]
        return str(value).replace("torch.", "") if value not in ("", None) else "-"
    return f"?{code}"


def encode(seq: int, op: str, tensor: torch.Tensor | None, *, algorithm: str = "",
           reduce_op: str = "", root: int = -1) -> torch.Tensor:
    """The header of one call as an int64 tensor of length HEADER_LEN."""
    shape = tuple(tensor.shape) if tensor is not None else ()
    if len(shape) > MAX_DIMS:
        # Fold the trailing dimensions: enough to detect a mismatch.
        shape = shape[:MAX_DIMS - 1] + (int(torch.tensor(shape[MAX_DIMS - 1:]).prod()),)
    dtype = tensor.dtype if tensor is not None else None
    head = [seq, _code(OPERATIONS, op), _code(ALGORITHM_CODES, algorithm),
            _code(REDUCE_CODES, reduce_op), root, _code(DTYPES, dtype), len(shape)]
    head += list(shape) + [-1] * (MAX_DIMS - len(shape))
    return torch.tensor(head, dtype=torch.int64)


def describe(header: list[int]) -> str:
    seq, op, algo, red, root, dtype, ndim = header[:7]
    shape = tuple(header[7:7 + ndim])
    parts = [f"#{seq} {_name(OPERATIONS, op)}"]
    if algo:
        parts.append(f"algorithm={_name(ALGORITHM_CODES, algo)}")
    if red:
        parts.append(f"op={_name(REDUCE_CODES, red)}")
    if root >= 0:
        parts.append(f"root={root}")
    if _name(OPERATIONS, op) != "barrier":
        parts.append(f"{_name(DTYPES, dtype)}{list(shape)}")
    return " ".join(parts)


def all_gather_rows(group: Group, row: torch.Tensor, what: str) -> list[list[int]]:
    """Every rank's int64 ``row`` (same length everywhere), as lists, in rank order."""
    rows = [torch.empty_like(row) for _ in range(group.size)]
    try:
        group.engine.all_gather(rows, row, group.pg).wait()
    except RuntimeError as exc:
        raise translate(exc, what=f"check of {what}", rank=group.rank) from exc
    return [r.tolist() for r in rows]


def verify_call(group: Group, header: torch.Tensor, what: str) -> None:
    """Raise CollectiveMismatchError unless every rank of ``group`` sent the same header."""
    rows = all_gather_rows(group, header, what)
    if all(r == rows[0] for r in rows):
        return
    table = "\n".join(f"  rank {i}: {describe(r)}" for i, r in enumerate(rows))
    raise CollectiveMismatchError(f"ranks disagree on collective {what}:\n{table}")


def verify_tensors(group: Group, what: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """Check that every rank holds the same list of tensors (count, shapes, dtypes), e.g. the
    parameters of a model before they are broadcast. The error names the first tensor that
    differs, the ranks and their shapes."""
    counts = all_gather_rows(group, torch.tensor([len(named)], dtype=torch.int64), what)
    if any(c != counts[0] for c in counts):
        table = "\n".join(f"  rank {i}: {c[0]} tensors" for i, c in enumerate(counts))
        raise CollectiveMismatchError(f"ranks hold different numbers of {what}:\n{table}")
    if not named:
        return
    mine = torch.stack([encode(0, "tensors", t) for _, t in named]).view(-1)
    rows = all_gather_rows(group, mine, what)
    for k, (name, _) in enumerate(named):
        cut = [r[k * HEADER_LEN:(k + 1) * HEADER_LEN] for r in rows]
        if any(c != cut[0] for c in cut):
            table = "\n".join(f"  rank {i}: {describe(c).split(' ', 2)[-1]}"
                              for i, c in enumerate(cut))
            raise CollectiveMismatchError(f"{what} differ between ranks at {name!r}:\n{table}")
