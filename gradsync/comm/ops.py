"""Reduction operators, the element-wise combine step every algorithm shares, and the codes
of the operations (for check mode and the heartbeats)."""

from __future__ import annotations

from enum import Enum

import torch


class ReduceOp(str, Enum):
    """Reduction operators; plain strings ("sum", "avg", ...) are accepted wherever one is."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    PRODUCT = "prod"


# The collective operations, in the order of their codes in check-mode headers and heartbeats.
OPERATIONS = ("broadcast", "reduce", "all_reduce", "gather", "all_gather", "reduce_scatter",
              "scatter", "barrier", "tensors")

_ALIASES = {"product": "prod", "mean": "avg", "average": "avg"}


def as_op(op: ReduceOp | str) -> ReduceOp:
    """Normalise ``op`` to a :class:`ReduceOp`; raises ValueError naming the bad value."""
    if isinstance(op, ReduceOp):
        return op
    name = str(op).lower()
    name = _ALIASES.get(name, name)
    try:
        return ReduceOp(name)
    except ValueError:
        known = ", ".join(o.value for o in ReduceOp)
        raise ValueError(f"unknown reduce op {op!r}; expected one of {known}") from None


def check_op_dtype(op: ReduceOp, dtype: torch.dtype) -> None:
    """AVG divides by the world size, which has no exact meaning for integers."""
    if op is ReduceOp.AVG and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"reduce op 'avg' needs a floating-point tensor, got {dtype}; "
                        "use 'sum' and divide yourself")


def wire_op(op: ReduceOp) -> ReduceOp:
    """What travels: AVG is summed by every algorithm and engine, then :func:`finish_`
    divides once at the end (the only place AVG's division happens)."""
    return ReduceOp.SUM if op is ReduceOp.AVG else op


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite.

    First a plain sum, one read with no temporary: a NaN or Inf anywhere makes it NaN or Inf,
    so a finite sum proves every value finite. Only a non-finite sum (a bad value, or finite
    values whose sum overflows) pays for the exact pass: ``x * 0`` is 0 for every finite x
    and NaN for NaN and Inf, and a sum with a NaN term is NaN. Both are several times faster
    on CPU than ``isfinite().all()`` with its bool tensor."""
    if t.is_floating_point() or t.is_complex():
        if bool(torch.isfinite(t.sum())):
            return True
        return not bool(torch.isnan(torch.mul(t, 0).sum()))
    return True


def combine_(acc: torch.Tensor, other: torch.Tensor, op: ReduceOp) -> None:
    """``acc = acc (op) other`` in place. AVG combines as SUM; :func:`finish_` divides."""
    if op is ReduceOp.SUM or op is ReduceOp.AVG:
        acc.add_(other)
    elif op is ReduceOp.MAX:
        torch.maximum(acc, other, out=acc)
    elif op is ReduceOp.MIN:
        torch.minimum(acc, other, out=acc)
    elif op is ReduceOp.PRODUCT:
        acc.mul_(other)
    else:  # pragma: no cover - exhaustive above
        raise ValueError(op)


def finish_(tensor: torch.Tensor, op: ReduceOp, world_size: int) -> None:
    """Apply the division of AVG after the sum. Every rank divides identical bits, so results
    stay bitwise equal across ranks."""
    if op is ReduceOp.AVG and world_size > 1:
        tensor.div_(world_size)
