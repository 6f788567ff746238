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

Vectors (biases) and matrices too small to gain ``min_compression_rate`` are averaged
uncompressed, in P's all-reduce. The two all-reduces carry every bucket of the step, not
one (``powersgd_step.py``): torch's hook runs three per bucket, and at tens of KB each costs
its latency, not its bytes.

The arithmetic follows torch's ``powerSGD_hook`` operation for operation (the seeds of the
random Q, the order of the matrices, the kernels, where the division by the world size
happens), so torch's hook on torch's DDP is the oracle for it: tests/test_powersgd.py trains
the same model both ways and compares the parameters bit for bit. :func:`naive_powersgd_step`
(``lowrank.py``) is the same math on every rank's matrix at once, in one process, with an
independent orthogonalisation (QR).

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
from .bucket import GradBucket
from .default import HookState, allreduce_hook
from .lowrank import naive_powersgd_step, orthogonalize_, split_by_rank
from .powersgd_step import Step, compress_bucket

__all__ = ["PowerSGDState", "powersgd", "powersgd_hook", "split_matrices", "orthogonalize_",
           "naive_powersgd_step"]


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
    pending: Step | None = field(default=None, repr=False)
    """The step whose buckets are being compressed, until its last bucket launches it."""

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


def split_matrices(state: PowerSGDState, grads: list[torch.Tensor]):
    """(matrices (n, m) worth compressing at the state's rank, the other gradients), views
    of the bucket."""
    return split_by_rank(state.matrix_approximation_rank, state.min_compression_rate, grads)


def powersgd_hook(state: PowerSGDState, bucket: GradBucket) -> comm.Work:
    """Average ``bucket`` by PowerSGD; the handle's ``wait()`` gives the flat result.

    The bucket's error feedback and P = M Q run now; its all-reduces run with the other
    buckets' of the step, two in all (``powersgd_step.py``), the first started at the
    step's last bucket, the second at the first wait."""
    compress = state.iter >= state.start_iter
    if bucket.is_last():
        state.iter += 1
    if not compress:
        return allreduce_hook(state, bucket)
    group = state.resolve(bucket)
    step = state.pending
    if step is None or step.group is not group:
        step = state.pending = Step(state, group)
    part = compress_bucket(state, bucket, group.size)
    step.add(part)
    if bucket.is_last():
        step.launch()
    return comm.Work(lambda: step.wait(part))
