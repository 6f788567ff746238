"""Compressed pushes: what a worker puts on the wire instead of a shard's dense gradient, and
how a server turns it back into one. Pulls stay full precision.

- ``fp16`` / ``bf16``: a PUSH whose header's ``dtype`` is the half type. Its payload holds the
  gradient divided by the number of workers N *before* the cast, so that fp16 (largest value
  65504) cannot overflow where the average would not (as DDP's ``fp16_compress_hook`` divides
  first). The server casts back to the shard's dtype and multiplies by N there, where overflow
  is no concern, so the consistency modes go on averaging dense gradients as they always did
  (``sync`` divides the sum by the live workers, ``async`` each push by them).
- ``topk:RATIO``: a PUSH_SPARSE of k = ceil(RATIO * numel) entries, payload

      indices: int64[k] | values: shard dtype[k] | END

  (indices first, so both views stay aligned for any k). The values are the k entries of
  ``grad + residual`` largest in magnitude; what is left stays in the worker's residual for
  the next step (error feedback, Seide et al., 2014; Stich et al., 2018), so over T steps
  ``sum(pushed) + residual == sum(grad)``. The server scatters them into a dense zero
  gradient. k(8 + elsize) bytes against numel * elsize: fewer only while RATIO < elsize /
  (8 + elsize), i.e. below 0.5 for float64 and 1/3 for float32.

Nothing here trusts a worker: the receiver (``receive.py``) checks the header's sizes before
it receives a byte of payload, and :func:`decode` checks the indices (in range, distinct) and
leaves the finiteness check to the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress.cast import HALF_DTYPES as HALF
from ..compress.spec import Compression, parse
from ..compress.topk import select, topk_count
from .protocol import DTYPE_CODES, END_BYTES, Kind, Status

INDEX_BYTES = 8  # int64 indices


def check_compression(spec: str | Compression) -> Compression:
    """``spec`` (parsed once by the caller, or a string parsed here), if the parameter
    server pushes with it (the compressor table's ``ps``).

    Raises:
        ValueError: a malformed spec (from :func:`gradsync.compress.spec.parse`), or one the
            parameter server does not push (powersgd).
    """
    compression = parse(spec)
    if not compression.compressor.ps:
        raise ValueError(f"--compression {compression}: the parameter server does not support "
                         f"{compression.name} (its low-rank factors need an all-reduce among "
                         "the workers); use fp16, bf16 or topk:RATIO, or --arch allreduce")
    return compression


def sparse_nbytes(k: int, dtype: torch.dtype) -> int:
    """Payload bytes of a PUSH_SPARSE with ``k`` entries (without the END trailer)."""
    return k * (INDEX_BYTES + dtype.itemsize)


def _check_dtype(compression: Compression, dtype: torch.dtype) -> None:
    half = HALF.get(compression.name)
    if half is not None and dtype.itemsize <= half.itemsize:
        # Also keeps the header unambiguous: a PUSH of the half dtype means "divided by N".
        raise ValueError(f"--compression {compression}: the parameters are already "
                         f"{str(dtype).removeprefix('torch.')}; a cast saves nothing")


@dataclass(frozen=True)
class PushRules:
    """What a server accepts for one shard beside a dense PUSH of its own dtype.

    Attributes:
        half: the dtype of a cast PUSH (its values are gradient / ``workers``); None: none.
        max_k: entries a PUSH_SPARSE may carry at most; None: sparse pushes are refused.
        workers: N, the factor a cast payload is multiplied back by.
    """

    half: torch.dtype | None = None
    max_k: int | None = None
    workers: int = 1

    @classmethod
    def of(cls, spec: str | Compression, dtype: torch.dtype, numel: int,
           workers: int) -> "PushRules":
        compression = check_compression(spec)
        _check_dtype(compression, dtype)
        max_k = topk_count(numel, compression.arg) if compression.name == "topk" else None
        return cls(HALF.get(compression.name), max_k, workers)

    def max_nbytes(self, dtype: torch.dtype, numel: int) -> int:
        """The largest payload (without END) a worker may push for this shard."""
        dense = numel * dtype.itemsize
        return max(dense, sparse_nbytes(self.max_k, dtype)) if self.max_k is not None else dense


def decode(kind: int, k: int, wire_dtype: torch.dtype, wire: torch.Tensor, numel: int,
           ) -> tuple[Status, str, torch.Tensor, torch.Tensor | None]:
    """Split a received payload into its values and indices, checking the indices. Its header
    was checked by ``protocol.validate``, its length and END by the receiver.

    Args:
        kind: PUSH or PUSH_SPARSE; k: the header's ``numel`` (entries of a sparse push).
        wire_dtype: the header's dtype (the shard's, or the half type of a cast push).
        wire: the payload's bytes (nbytes,) uint8, without END.
        numel: the shard's element count.

    Returns:
        (status, what was wrong ("" when OK), the values as sent, (numel,) or (k,) of
        ``wire_dtype``, the indices (k,) int64 of a sparse push, else None). The caller checks
        the values for NaN and Inf, then calls :func:`densify`.
    """
    values = wire[k * INDEX_BYTES:] if kind == Kind.PUSH_SPARSE else wire
    values = values.view(wire_dtype)
    if kind != Kind.PUSH_SPARSE:
        return Status.OK, "", values, None
    indices = wire[:k * INDEX_BYTES].view(torch.int64)  # (k,)
    if k:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            return (Status.BAD_INDEX, f"index {lo if lo < 0 else hi} is out of range for a "
                                      f"shard of {numel} elements", values, indices)
        # Distinct, or the sum would depend on the order the scatter visits them.
        ordered = indices.sort().values
        same = (ordered[1:] == ordered[:-1]).nonzero()
        if len(same):
            return (Status.BAD_INDEX, f"index {int(ordered[int(same[0])])} appears more than "
                                      "once", values, indices)
    return Status.OK, "", values, indices


def densify(values: torch.Tensor, indices: torch.Tensor | None, dtype: torch.dtype, numel: int,
            rules: PushRules) -> torch.Tensor:
    """The dense gradient (numel,) of ``dtype`` of a decoded push (see :func:`decode`)."""
    if indices is not None:
        return torch.zeros(numel, dtype=dtype).index_copy_(0, indices, values)
    if values.dtype == dtype:
        return values  # a plain dense push, as received: no copy
    return values.to(dtype).mul_(rules.workers)  # the worker divided by N before the cast


class PushCompressor:
    """A worker's side: encodes each shard's gradient for its push.

    Args:
        compression: fp16, bf16 or topk (check_compression's result).
        shard_numels: elements of each unit pushed (a partition of a shard).
        dtype: the parameters' dtype, or one per unit.
        workers: N; a cast payload carries gradient / N.
    """

    def __init__(self, compression: Compression, shard_numels: list[int],
                 dtype: torch.dtype | list[torch.dtype], workers: int):
        dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * len(shard_numels)
        for d in set(dtypes):
            _check_dtype(compression, d)
        self.compression, self.dtypes, self.workers = compression, dtypes, workers
        self.half = HALF.get(compression.name)
        trailer = torch.frombuffer(bytearray(END_BYTES), dtype=torch.uint8)
        if self.half is not None:
            self.ks = list(shard_numels)
            sizes = [n * self.half.itemsize for n in shard_numels]
        else:
            self.ks = [topk_count(n, compression.arg) for n in shard_numels]
            sizes = [sparse_nbytes(k, d) for k, d in zip(self.ks, dtypes)]
        # One wire buffer per unit, payload then END (written once); a push's send must
        # finish before the next push of that unit rewrites it (the worker waits at step()).
        self.wires = [torch.empty(n + len(END_BYTES), dtype=torch.uint8) for n in sizes]
        for wire in self.wires:
            wire[-len(END_BYTES):].copy_(trailer)
        self.residuals = ([torch.zeros(n, dtype=d) for n, d in zip(shard_numels, dtypes)]
                          if self.half is None else [])
        """Error feedback: per unit, what top-k has not pushed yet, (numel,) of its dtype."""

    def encode(self, k: int, grad: torch.Tensor) -> tuple[Kind, int, int, torch.Tensor]:
        """Encode shard ``k``'s gradient ``grad`` (numel,), which it may overwrite.

        Returns:
            (kind, dtype code, the header's numel, the wire: payload then END).
        """
        wire = self.wires[k]
        payload = wire[:-len(END_BYTES)]
        if self.half is not None:
            # Divide first: the half cast of the average cannot overflow where the float
            # average would not; the server multiplies back by N in full precision.
            payload.view(self.half).copy_(grad.div_(self.workers))
            return Kind.PUSH, DTYPE_CODES[self.half], grad.numel(), wire
        count = self.ks[k]
        acc = self.residuals[k].add_(grad)  # (numel,): grad + what earlier steps left
        indices = payload[:count * INDEX_BYTES].view(torch.int64)  # (count,)
        values = payload[count * INDEX_BYTES:].view(self.dtypes[k])  # (count,)
        indices.copy_(select(acc, count))  # the all-reduce hook's choice of entries
        torch.index_select(acc, 0, indices, out=values)
        acc.index_fill_(0, indices, 0)  # the rest stays: residual = acc - pushed, exactly
        return Kind.PUSH_SPARSE, DTYPE_CODES[self.dtypes[k]], count, wire
