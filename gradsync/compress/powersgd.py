"""PowerSGD: rank-r gradient compression by one step of power iteration (Vogels, Karimireddy
and Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
NeurIPS 2019, Algorithms 1 and 2), as a comm hook for :class:`gradsync.DataParallel`.

Each gradient of a bucket, viewed as a matrix M (n, m) with n its first dimension, travels
as two thin matrices P (n, r) and Q (m, r), (n + m) r numbers instead of n m:

    M += residual                  error feedback: what earlier steps failed to send
    P  = M Q                       Q orthonormalised; from the last step (warm start) or random
    P  = all_reduce_sum(P); orthogonalise P        (one all-reduce for all matrices)
    Q  = all_reduce_mean(M^T P)                    (a second one)
    M  = P Q^T                     the average of all ranks' M, projected on span(P)
    residual = (M + residual before) - P Q^T

Vectors (biases) and matrices too small to gain ``min_compression_rate`` are averaged by a
third, plain all-reduce, packed into one buffer.

The hook follows torch's ``powerSGD_hook`` operation for operation (the seeds of the random
Q, the order of the matrices, the kernels, where the division by the world size happens), so
torch's hook on torch's DDP is the oracle for it: tests/test_powersgd.py trains the same
model both ways and compares the parameters bit for bit. :func:`naive_powersgd_step` beside
it is the same math on every rank's matrix at once, in one process, with an independent
orthogonalisation (QR).

Usage::

    state, hook = powersgd(2, start_iter=10)
    model = gradsync.DataParallel(model)
    model.register_comm_hook(state, hook)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import comm
from .bucket import GradBucket, Timer, bus_bytes
from .default import HookState, allreduce_hook


@dataclass
class PowerSGDState(HookState):
    """PowerSGD's settings and what it carries from step to step (per bucket index).

    The settings have torch's ``PowerSGDState`` meanings and defaults, except ``start_iter``:
    see :func:`powersgd`.
    """

    matrix_approximation_rank: int = 1
    """r: columns of P and Q; lower is stronger compression (the paper uses 1 to 4)."""
    start_iter: int = 0
    """Steps of plain all-reduce before compressing (torch's ``start_powerSGD_iter``)."""
    min_compression_rate: float = 2.0
    """Compress a matrix only if n m > (n + m) r times this; the rest travels uncompressed."""
    use_error_feedback: bool = True
    """Add what compression lost last step to this step's gradient (the paper's Algorithm 2);
    without it PowerSGD is biased and converges worse."""
    warm_start: bool = True
    """Start the power iteration from last step's Q instead of a random one."""
    orthogonalization_epsilon: float = 0.0
    """Added to the column norms in Gram-Schmidt; e.g. 1e-8 guards against a zero column
    (a layer whose gradient vanished), 0 is exact."""
    random_seed: int = 0
    """Seeds the random Q; every rank draws the same ones, a new one at each random start."""
    iter: int = 0
    """Steps seen (counted on each step's last bucket)."""
    residuals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    """(numel,) error-feedback memory of each bucket."""
    q_memory: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    """(sum of m r,) the Qs of each bucket's matrices, flat, for the warm start."""

    def __post_init__(self) -> None:
        if self.matrix_approximation_rank < 1:
            raise ValueError(f"matrix_approximation_rank must be >= 1, got "
                             f"{self.matrix_approximation_rank}")
        if self.start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {self.start_iter}")
        if not self.min_compression_rate > 0:
            raise ValueError(f"min_compression_rate must be > 0, got "
                             f"{self.min_compression_rate}")
        if self.orthogonalization_epsilon < 0:
            raise ValueError(f"orthogonalization_epsilon must be >= 0, got "
                             f"{self.orthogonalization_epsilon}")
        # numpy's generator, as torch's hook: each random start draws a torch seed from it,
        # so every rank, and torch's hook with the same random_seed, draws the same Qs.
        self.rng = np.random.RandomState(self.random_seed)

    def draw_q(self, shapes: list[tuple[int, int]], dtype=torch.float32) -> list[torch.Tensor]:
        """Random starting Qs (m, r), one per shape, standard normal; advances the seed."""
        generator = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))
        return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def powersgd(rank: int, group: comm.Group | None = None, *, start_iter: int = 0,
             min_compression_rate: float = 2.0, use_error_feedback: bool = True,
             warm_start: bool = True, orthogonalization_epsilon: float = 0.0,
             random_seed: int = 0, algorithm: str = "auto"):
    """PowerSGD of rank ``rank`` for ``DataParallel.register_comm_hook``.

    Defaults are torch's, but for ``start_iter``: torch's hook waits 1,000 steps, partly
    because DDP rebuilds its buckets after the first step and the residuals and Qs would no
    longer fit them. gradsync's buckets never change, and ``--compression-warmup`` (or
    ``spec.make_hook(..., warmup=)``) puts plain steps before any compressor, so 0 here.

    Args:
        rank: r, the columns of P and Q.
        group: the ranks to average over (default: the bucket's, i.e. DataParallel's).
        start_iter, min_compression_rate, use_error_feedback, warm_start,
        orthogonalization_epsilon, random_seed: see :class:`PowerSGDState`.
        algorithm: the all-reduce algorithm of the three all-reduces.
    Returns:
        ``(state, powersgd_hook)``.
    Raises:
        ValueError: a setting out of range.
    """
    comm.check_algorithm(algorithm)
    state = PowerSGDState(group, algorithm, matrix_approximation_rank=rank,
                          start_iter=start_iter, min_compression_rate=min_compression_rate,
                          use_error_feedback=use_error_feedback, warm_start=warm_start,
                          orthogonalization_epsilon=orthogonalization_epsilon,
                          random_seed=random_seed)
    return state, powersgd_hook


def orthogonalize_(matrix: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``matrix`` (n, r), in place: each column normalised,
    then removed from the columns after it (modified Gram-Schmidt, stabler than the classic
    order). With ``epsilon`` 0 a zero column gives NaN."""
    for i in range(matrix.shape[-1]):
        col = matrix[..., i:i + 1]                         # (..., n, 1)
        col /= torch.norm(col, dim=-2, keepdim=True) + epsilon
        if i + 1 < matrix.shape[-1]:
            rest = matrix[..., i + 1:]                     # (..., n, r - i - 1)
            rest -= torch.sum(col * rest, dim=-2, keepdim=True) * col
    return matrix


def split_matrices(state: PowerSGDState, grads: list[torch.Tensor]):
    """(matrices (n, m) worth compressing, the other gradients), views of the bucket."""
    matrices, dense = [], []
    for g in grads:
        if g.dim() <= 1 or g.numel() == 0:
            dense.append(g)
            continue
        n = g.shape[0]
        m = g.numel() // n
        r = min(n, m, state.matrix_approximation_rank)
        if (n + m) * r * state.min_compression_rate < n * m:
            matrices.append(g.view(n, m))
        else:
            dense.append(g)
    # Grouped by shape, in order of first appearance, as torch's hook processes them, so
    # that each matrix draws the same random Q as there.
    first = {}
    for mat in matrices:
        first.setdefault(mat.shape, len(first))
    return sorted(matrices, key=lambda mat: first[mat.shape]), dense


def _views(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for rows, cols in shapes:
        out.append(flat[offset:offset + rows * cols].view(rows, cols))
        offset += rows * cols
    return out


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    # bmm on a batch of one, as torch's hook: for small products CPU bmm and mm use
    # different kernels (different rounding), and the oracle test compares bits.
    torch.bmm(a.unsqueeze(0), b.unsqueeze(0), out=out.unsqueeze(0))


def _add_residual(state: PowerSGDState, index: int, buf: torch.Tensor) -> torch.Tensor | None:
    """Error feedback: add to ``buf`` (numel,) what bucket ``index`` failed to send before,
    and return the residual (numel,) holding that sum, from which the hook takes the result
    off at the end. None: no error feedback."""
    if not state.use_error_feedback:
        return None
    residual = state.residuals.get(index)
    if residual is None:
        residual = state.residuals[index] = torch.zeros_like(buf)
    buf.add_(residual)
    residual.copy_(buf)                # M + old residual; the result is taken off below
    return residual


def _starting_q(state: PowerSGDState, index: int, q_shapes: list[tuple[int, int]],
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


def powersgd_hook(state: PowerSGDState, bucket: GradBucket) -> comm.Work:
    """Average ``bucket`` by PowerSGD; the handle's ``wait()`` gives the flat result."""
    compress = state.iter >= state.start_iter
    if bucket.is_last():
        state.iter += 1
    if not compress:
        return allreduce_hook(state, bucket)
    group, stats, index = state.resolve(bucket), state.stats, bucket.index()
    world = group.size
    buf = bucket.buffer()                                  # (numel,) this rank's gradients
    stats.buckets += 1
    stats.bytes_dense += bus_bytes(buf.numel() * buf.element_size(), world)

    with Timer(stats):
        residual = _add_residual(state, index, buf)
        matrices, dense = split_matrices(state, bucket.gradients())
        packed = torch.cat([g.reshape(-1) for g in dense]) if dense else buf.new_empty(0)
    dense_work = _all_reduce_async(state, packed, group)

    with Timer(stats):
        ranks = [min(*mat.shape, state.matrix_approximation_rank) for mat in matrices]
        q_shapes = [(mat.shape[1], r) for mat, r in zip(matrices, ranks)]
        q_flat = _starting_q(state, index, q_shapes, buf)
        qs = _views(q_flat, q_shapes)                      # each (m, r)
        p_flat = buf.new_empty(sum(mat.shape[0] * r for mat, r in zip(matrices, ranks)))
        ps = _views(p_flat, [(mat.shape[0], r) for mat, r in zip(matrices, ranks)])  # (n, r)
        for mat, q, p in zip(matrices, qs, ps):
            orthogonalize_(q, state.orthogonalization_epsilon)
            _mm(mat, q, out=p)
    # Summed, not averaged: orthogonalisation removes any scale, and dividing would round.
    p_work = _all_reduce_async(state, p_flat, group)
    stats.bytes_sent += sum(bus_bytes(t.numel() * t.element_size(), world)
                            for t in (packed, p_flat, q_flat))

    def finish() -> torch.Tensor:
        dense_work.wait()
        with Timer(stats):
            _unpack_dense(packed, dense, world)
        p_work.wait()
        with Timer(stats):
            for mat, p, q in zip(matrices, ps, qs):
                orthogonalize_(p, state.orthogonalization_epsilon)
                _mm(mat.t(), p, out=q)                     # Q = M^T P, (m, r)
        _all_reduce_async(state, q_flat, group).wait()
        with Timer(stats):
            q_flat.div_(world)                             # Q = mean over ranks of M^T P
            for mat, p, q in zip(matrices, ps, qs):
                _mm(p, q.t(), out=mat)                     # M ~ P Q^T, (n, m), in the bucket
            if residual is not None:
                # Over the whole bucket, as torch's hook: for the uncompressed part it is
                # own minus average, which sums to zero over ranks; either way, per rank,
                # the results so far plus the residual are the gradients so far.
                residual.sub_(buf)
        return buf

    return comm.Work(finish)


def _all_reduce_async(state: PowerSGDState, tensor: torch.Tensor, group: comm.Group):
    """Sum ``tensor`` over ``group``; nothing to send (no such matrices) is no collective,
    alike on every rank since all hold the same layout."""
    if tensor.numel() == 0:
        return comm.Work(lambda: tensor)
    return comm.all_reduce_async(tensor, op="sum", group=group, algorithm=state.algorithm)


def naive_powersgd_step(matrices: list[torch.Tensor], q: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One PowerSGD step of one matrix, from every rank's copy at once (the test oracle).

    Args:
        matrices: each rank's M (n, m), error feedback already added.
        q: (m, r) the Q the step starts from (every rank's is the same).
    Returns:
        ``(approx, q_next, residuals)``: the averaged approximation P Q^T (n, m) every rank
        ends with, the Q (m, r) a warm start continues from, each rank's M - approx.
    """
    world = len(matrices)
    q_hat, _ = torch.linalg.qr(q)                          # (m, r) orthonormal
    p_hat, _ = torch.linalg.qr(sum(mat @ q_hat for mat in matrices))  # (n, r)
    q_next = sum(mat.t() @ p_hat for mat in matrices) / world         # (m, r)
    # QR may flip the sign of a column of P against Gram-Schmidt's; Q flips with it, so
    # P Q^T is the same.
    approx = p_hat @ q_next.t()
    return approx, q_next, [mat - approx for mat in matrices]
