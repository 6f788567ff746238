"""The linear algebra of PowerSGD (``powersgd.py``): which gradients are worth compressing,
Gram-Schmidt, the products, and the one-process oracle of a step.

The products and the orthogonalisation follow torch's ``powerSGD_hook`` kernel for kernel,
so that gradsync's hook equals torch's bit for bit (tests/test_powersgd.py).
"""

from __future__ import annotations

import torch


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


def split_by_rank(rank: int, min_compression_rate: float, grads: list[torch.Tensor]):
    """(matrices (n, m) worth compressing at ``rank``, the other gradients), views of the
    bucket: a matrix is compressed if n m > (n + m) r ``min_compression_rate``."""
    matrices, dense = [], []
    for g in grads:
        if g.dim() <= 1 or g.numel() == 0:
            dense.append(g)
            continue
        n = g.shape[0]
        m = g.numel() // n
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            matrices.append(g.view(n, m))
        else:
            dense.append(g)
    # Grouped by shape, in order of first appearance, as torch's hook processes them, so
    # that each matrix draws the same random Q as there.
    first = {}
    for mat in matrices:
        first.setdefault(mat.shape, len(first))
    return sorted(matrices, key=lambda mat: first[mat.shape]), dense


def views(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Consecutive (rows, cols) views of ``flat``."""
    out, offset = [], 0
    for rows, cols in shapes:
        out.append(flat[offset:offset + rows * cols].view(rows, cols))
        offset += rows * cols
    return out


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b``. bmm on a batch of one, as torch's hook: for small products CPU bmm
    and mm use different kernels (different rounding), and the oracle test compares bits."""
    torch.bmm(a.unsqueeze(0), b.unsqueeze(0), out=out.unsqueeze(0))


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
