"""Cutting ``range(total)`` into even contiguous pieces: the one function for it.

Torch-free on purpose: the serving front end (serve/batcher.py) splits a batch's rows across
replicas with it without loading torch, and comm/ splits buffers across ranks with it
(every rank computes the same bounds from the same arithmetic, so pieces pair up).
"""

from __future__ import annotations


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``parts`` contiguous pieces whose sizes differ by at most 1.

    The first ``numel % parts`` pieces get one extra element; pieces may be empty when
    ``numel < parts``.

    Returns:
        ``parts`` pairs ``(start, stop)``, in order, covering ``range(numel)`` once.
    """
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
