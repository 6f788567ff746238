"""Fit the cost model on the cluster at hand (collective: every rank calls it)."""

from __future__ import annotations

import statistics
import time

import torch

from .algorithms.registry import ALGORITHMS
from .collectives import all_reduce, broadcast, one_host
from .cost_model import CostModel, shape
from .group import Group, resolve


def median_time(fn, repeat: int) -> float:
    """The median seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up: a first use sets up connections, allocates, compiles
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(group: Group | None = None, *, small: int = 1 << 10, large: int = 8 << 20,
              repeat: int = 15) -> CostModel:
    """Fit a :class:`CostModel` on ``group`` (collective: every rank must call it).

    Two sizes per algorithm, median of ``repeat`` calls each, give its alpha and beta by a
    two-point fit; gamma is a local ``add_``. Rank 0's fit is broadcast so that every rank
    makes the same choices (they must: ranks that pick different algorithms deadlock).
    """
    group = resolve(group)
    p = group.size
    if p == 1:
        return CostModel()
    x, y = torch.ones(large // 4), torch.ones(large // 4)
    gamma = median_time(lambda: x.add_(y), repeat) / large
    # shm runs only when every rank is on one host, which the group's topology says.
    measured = tuple(a for a in ALGORITHMS if a != "shm" or one_host(group))
    fitted = []
    for algorithm in measured:
        t = {size: median_time(lambda b=torch.zeros(size // 4): all_reduce(
                 b, group=group, algorithm=algorithm), repeat) for size in (small, large)}
        m_small, w_small, r_small = shape(algorithm, small, p)
        _, w_large, r_large = shape(algorithm, large, p)
        beta = max(1e-13, (t[large] - t[small] - (r_large - r_small) * gamma)
                   / (w_large - w_small))
        alpha = max(1e-7, (t[small] - w_small * beta - r_small * gamma) / m_small)
        fitted += [alpha, beta]
    values = torch.tensor(fitted + [gamma], dtype=torch.float64)
    broadcast(values, src=0, group=group)
    v = values.tolist()
    links = CostModel().links  # the defaults for what could not be measured here
    links.update({a: (v[2 * i], v[2 * i + 1]) for i, a in enumerate(measured)})
    return CostModel(links, v[-1])
