"""One step of PowerSGD over all of its buckets: two all-reduces a step, not three a bucket.

Torch's ``powerSGD_hook`` runs three all-reduces per bucket (the uncompressed tensors, P, Q),
six a step for a model of two buckets. Each is small (tens of KB at rank 4) and so costs its
messages' latency, not bandwidth: a ring of 3 ranks is 4 messages in a row, and where ranks
outnumber cores each message also waits for its receiver to be scheduled again. gradsync's
hook does a bucket's local work when the bucket is ready, inside backward (error feedback,
P = M Q), as torch's does, but its collectives once per step: at the last bucket, every
bucket's uncompressed tensors and P travel in one all-reduce; at the first wait, every
bucket's Q in a second. The arithmetic is torch's, operation for operation (``lowrank.py``);
only where each element sits in the all-reduced buffer changes, which changes no sum of two
ranks and, with more, only the order in which the ring adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import comm
from .bucket import GradBucket, Timer, bus_bytes
from .lowrank import mm, orthogonalize_, split_by_rank, views


@dataclass
class BucketPart:
    """One bucket's share of a step. Shapes: ``buf`` (numel,) the bucket, ``outs`` (n, m)
    views of it, ``matrices`` the same views of M (the residual, with error feedback),
    ``ps`` (n, r) views of ``p_flat``, ``qs`` (m, r) views of ``q_flat``, ``packed`` M's
    uncompressed tensors end to end, ``dense`` where they go back in the bucket."""

    buf: torch.Tensor
    residual: torch.Tensor | None
    matrices: list[torch.Tensor]
    outs: list[torch.Tensor]
    dense: list[torch.Tensor]
    packed: torch.Tensor
    p_flat: torch.Tensor
    ps: list[torch.Tensor]
    q_flat: torch.Tensor
    qs: list[torch.Tensor]


def compress_bucket(state, bucket: GradBucket, world: int) -> BucketPart:
    """Error feedback and P = M Q for ``bucket``, when it is ready (inside backward).

    ``state``: a PowerSGDState (its residuals, Q memory, rank and stats)."""
    stats, index = state.stats, bucket.index()
    buf = bucket.buffer()                                  # (numel,) this rank's gradients
    stats.buckets += 1
    stats.bytes_dense += bus_bytes(buf.numel() * buf.element_size(), world)
    rank, rate = state.matrix_approximation_rank, state.min_compression_rate
    with Timer(stats):
        residual = _add_residual(state, index, buf)
        grads = bucket.gradients()                          # views of buf
        m = buf if residual is None else residual           # (numel,) M: the gradients + residual
        outs, dense = split_by_rank(rank, rate, grads)
        # the same views of M: split_by_rank orders by shape alone, so both lists align
        matrices, m_dense = split_by_rank(rank, rate, [m[o:o + g.numel()].view_as(g)
                                                       for o, g in zip(bucket.offsets(), grads)])
        packed = torch.cat([g.reshape(-1) for g in m_dense]) if dense else buf.new_empty(0)
        ranks = [min(*mat.shape, state.matrix_approximation_rank) for mat in matrices]
        q_shapes = [(mat.shape[1], r) for mat, r in zip(matrices, ranks)]
        q_flat = _starting_q(state, index, q_shapes, buf)
        qs = views(q_flat, q_shapes)                       # each (m, r)
        p_shapes = [(mat.shape[0], r) for mat, r in zip(matrices, ranks)]
        p_flat = buf.new_empty(sum(n * r for n, r in p_shapes))
        ps = views(p_flat, p_shapes)                       # each (n, r)
        for mat, q, p in zip(matrices, qs, ps):
            orthogonalize_(q, state.orthogonalization_epsilon)
            mm(mat, q, out=p)
    stats.bytes_sent += sum(bus_bytes(t.numel() * t.element_size(), world)
                            for t in (packed, p_flat, q_flat))
    return BucketPart(buf, residual, matrices, outs, dense, packed, p_flat, ps, q_flat, qs)


class Step:
    """The compressed buckets of one step and its two all-reduces.

    :meth:`launch` (at the last bucket) starts the first; the first :meth:`wait` of any
    bucket finishes the step for all of them (a wait before the launch launches with the
    buckets in so far).
    """

    def __init__(self, state, group: comm.Group):
        self.state, self.group = state, group
        self.parts: list[BucketPart] = []
        self._first: torch.Tensor | None = None  # every part's packed, then P, end to end
        self._work: comm.Work | None = None
        self._done = False

    def add(self, part: BucketPart) -> None:
        self.parts.append(part)

    def launch(self) -> None:
        """Sum every bucket's uncompressed tensors and P in one all-reduce. (P is summed,
        not averaged: orthogonalisation removes any scale, and dividing would round.)"""
        if self.state.pending is self:
            self.state.pending = None  # the next bucket starts the next step
        self._first = torch.cat([t for part in self.parts for t in (part.packed, part.p_flat)])
        self._work = all_reduce_async(self.state, self._first, self.group)

    def wait(self, part: BucketPart) -> torch.Tensor:
        """``part``'s bucket, averaged (the step is finished on the first call)."""
        if not self._done:
            self._finish()
        return part.buf

    def _finish(self) -> None:
        stats, world, eps = self.state.stats, self.group.size, self.state.orthogonalization_epsilon
        if self._work is None:
            self.launch()
        self._work.wait()
        with Timer(stats):
            _scatter(self._first, [t for part in self.parts for t in (part.packed, part.p_flat)])
            for part in self.parts:
                _unpack_dense(part.packed, part.dense, world)
                for mat, p, q in zip(part.matrices, part.ps, part.qs):
                    orthogonalize_(p, eps)
                    mm(mat.t(), p, out=q)                  # Q = M^T P, (m, r)
            second = torch.cat([part.q_flat for part in self.parts])
        all_reduce_async(self.state, second, self.group).wait()
        with Timer(stats):
            second.div_(world)                             # Q = mean over ranks of M^T P
            _scatter(second, [part.q_flat for part in self.parts])
            for part in self.parts:
                for out, p, q in zip(part.outs, part.ps, part.qs):
                    mm(p, q.t(), out=out)                  # M ~ P Q^T, (n, m), in the bucket
                if part.residual is not None:
                    # Over the whole bucket, as torch's hook: for the uncompressed part it
                    # is own minus average, which sums to zero over ranks; either way, per
                    # rank, the results so far plus the residual are the gradients so far.
                    part.residual.sub_(part.buf)
        self._done = True


def all_reduce_async(state, tensor: torch.Tensor, group: comm.Group) -> comm.Work:
    """Sum ``tensor`` over ``group`` with the state's algorithm; nothing to send (no such
    tensors) is no collective, alike on every rank since all hold the same layout."""
    if tensor.numel() == 0:
        return comm.Work(lambda: tensor)
    return comm.all_reduce_async(tensor, op="sum", group=group, algorithm=state.algorithm)


def _scatter(flat: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Copy ``flat`` back into ``parts``, which it holds end to end."""
    offset = 0
    for t in parts:
        t.copy_(flat[offset:offset + t.numel()])
        offset += t.numel()


def _add_residual(state, index: int, buf: torch.Tensor) -> torch.Tensor | None:
    """Error feedback: add ``buf`` (numel,) to what bucket ``index`` failed to send before,
    in the residual (numel,), which then holds M and is returned; the step takes the result
    off it at the end. (Torch's hook adds into the bucket and copies the sum: the same sum,
    one pass over the bucket more.) None: no error feedback."""
    if not state.use_error_feedback:
        return None
    residual = state.residuals.get(index)
    if residual is None:
        residual = state.residuals[index] = torch.zeros_like(buf)
    residual.add_(buf)                 # M = gradients + old residual
    return residual


def _starting_q(state, index: int, q_shapes: list[tuple[int, int]],
                buf: torch.Tensor) -> torch.Tensor:
    """(sum of m r,) the Qs the power iteration of bucket ``index`` starts from, flat: last
    step's (warm start), else random ones."""
    q_flat = state.q_memory.get(index) if state.warm_start else None
    if q_flat is None:
        # Drawn even for a bucket with no matrix, as torch's hook, so that the seeds of
        # the later buckets stay the same as there.
        drawn = state.draw_q(q_shapes, buf.dtype)
        q_flat = torch.cat([q.reshape(-1) for q in drawn]) if drawn else buf.new_empty(0)
        if state.warm_start:
            state.q_memory[index] = q_flat
    return q_flat


def _unpack_dense(packed: torch.Tensor, dense: list[torch.Tensor], world: int) -> None:
    """Average the summed uncompressed gradients ``packed`` and copy each back into its
    place in the bucket."""
    packed.div_(world)
    offset = 0
    for g in dense:
        g.copy_(packed[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
