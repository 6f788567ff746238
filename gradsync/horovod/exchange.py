"""``hvd.alltoall`` and ``hvd.reducescatter``: the collectives that give each rank its own
part. Both exchange shapes first (a rank's wrong arguments are one ValueError on every
rank), so their handles are complete when returned."""

from __future__ import annotations

import torch

from .. import comm
from . import trace
from .basics import Average, global_process_set, resolve_op
from .collectives import Handle, _done, _scale_
from .compression import Compression
from .join import OTHER, negotiate
from .shapes import exchange_shapes, split_rows


@trace.traced("alltoall")
def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Send rows ``splits[j]`` of ``tensor`` (consecutive, from the top) to member j.

    Args:
        splits: rows per destination (default: dim 0 split evenly; it must divide).
    Returns:
        ``(output, received_splits)``: the rows received, in source order, and how many
        came from each source. The counts travel in one all-gather, the rows point to
        point (each pair's rows once; empty pieces not at all).
    Raises:
        ValueError: on every rank, when a rank's splits do not fit its tensor.
    """
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="alltoall")
    tensor, p = tensor.detach().contiguous(), group.size
    if splits is None:
        splits = [tensor.shape[0] // p] * p if tensor.dim() and tensor.shape[0] % p == 0 \
            else None
    splits = None if splits is None else [int(s) for s in torch.as_tensor(splits).tolist()]
    fits = (splits is not None and len(splits) == p and min(splits) >= 0
            and tensor.dim() > 0 and sum(splits) == tensor.shape[0])
    exchange_shapes(group, tensor, "alltoall", name, same_first=False, ok=fits,
                    why="splits must be one count >= 0 per rank summing to dim 0")
    mine = torch.tensor(splits, dtype=torch.int64)
    table = comm.all_gather([torch.empty_like(mine) for _ in range(p)], mine, group=group)
    me = group.rank
    received = [int(row[me]) for row in table]         # rows from each source
    out = torch.empty((sum(received), *tensor.shape[1:]), dtype=tensor.dtype)
    sent = [0, *torch.tensor(splits).cumsum(0).tolist()]
    got = [0, *torch.tensor(received).cumsum(0).tolist()]
    out[got[me]:got[me + 1]] = tensor[sent[me]:sent[me + 1]]
    works = []
    for j in range(p):
        if j != me:  # (splits[j], *rest) to j; (received[j], *rest) from j
            works.append(comm.isend(tensor[sent[j]:sent[j + 1]], j, group, what="alltoall"))
            works.append(comm.irecv(out[got[j]:got[j + 1]], j, group, what="alltoall"))
    for work in works:
        work.wait()
    return out, torch.tensor(received, dtype=torch.int64)


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> Handle:
    return _done(alltoall(tensor, splits, name, process_set))


@trace.traced("reducescatter")
def reducescatter(tensor, name=None, compression=Compression.none, op=Average,
                  process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    """Reduce ``tensor`` (the same shape on every member) and give member r its share of
    dim 0: ``dim0 // size`` rows, one more for the first ``dim0 % size`` members.

    Raises:
        ValueError: on every rank, when shapes differ; Adasum.
    """
    group, op = process_set.resolve(), resolve_op(op)
    negotiate(OTHER, process_set=process_set, name="reducescatter")
    shapes = exchange_shapes(group, tensor.detach(), "reducescatter", name, same_first=True)
    counts = split_rows(shapes[0][0], group.size)
    rows = max(counts)
    data = tensor.detach().clone()
    _scale_(data, prescale_factor)
    payload, ctx = compression.compress(data)
    pieces, start = [], 0
    for n in counts:  # (rows, *rest) each, zero-padded: comm's pieces are equal
        piece = torch.zeros((rows, *payload.shape[1:]), dtype=payload.dtype)
        piece[:n] = payload[start:start + n]
        pieces.append(piece)
        start += n
    out = torch.empty_like(pieces[0])
    wire = comm.ReduceOp.SUM if op is Average else op
    comm.reduce_scatter(out, pieces, op=wire, group=group)
    result = compression.decompress(out[:counts[group.rank]], ctx).clone()
    _scale_(result, postscale_factor / group.size if op is Average else postscale_factor)
    return result


def reducescatter_async(tensor, name=None, compression=Compression.none, op=Average,
                        process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> Handle:
    return _done(reducescatter(tensor, name, compression, op, process_set, prescale_factor,
                               postscale_factor))
