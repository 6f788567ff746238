"""DataParallel against one process on the global batch, against the naive version, and its
error paths. Float64 and plain SGD make the comparison tight: the only difference left is
the order of additions in the average.

One world of 3 processes runs every check (tests/distributed.py's run_checks); worlds of 1
and 2 are sub-groups of it, so the processes start once for the whole file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, STEPS, global_batch, make_model

ALGORITHMS = ["auto", "native", "ring", "tree", "halving_doubling", "reduce_broadcast"]
WORLD = 3


def reference(world: int, accumulate: int = 1, lr: float = 0.1, momentum: float = 0.0):
    """One process, global batch world * accumulate * BATCH per step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for step in range(STEPS):
        x, y = global_batch(step, world * accumulate * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def _group(size):
    """The first ``size`` ranks of the world as a group (None on the others); every rank
    must call this, as new_group is collective."""
    from gradsync import comm

    return comm.world() if size == WORLD else comm.new_group(list(range(size)))


def _train(group, algorithm, accumulate, bucket_cap_mb, naive, momentum):
    import gradsync

    rank, n = group.rank, group.size
    model = make_model(seed=rank)  # different init per rank: wrapping must copy rank 0's
    if naive:
        dp = gradsync.DataParallelNaive(model, group=group, algorithm=algorithm)
    else:
        dp = gradsync.DataParallel(model, group=group, algorithm=algorithm,
                                   bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=momentum)
    for step in range(STEPS):
        x, y = global_batch(step, n * accumulate * BATCH)
        # Micro-batch k of rank r: the global batch is laid out [micro-batch][rank][sample].
        opt.zero_grad()
        for k in range(accumulate):
            lo = (k * n + rank) * BATCH
            sync = k == accumulate - 1 or naive
            with (_null() if sync else dp.no_sync()):
                loss = nn.functional.mse_loss(dp(x[lo:lo + BATCH]), y[lo:lo + BATCH])
                (loss / accumulate).backward()
        if naive:
            dp.sync_gradients()
        opt.step()
    return [p.detach().numpy().copy() for p in dp.parameters()]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _every_algorithm(rank, world, size):
    """Each algorithm on a world of ``size``; a tiny bucket cap spreads the 5 tensors over
    several buckets launched during backward."""
    group = _group(size)
    if group is None:
        return None
    return {algo: _train(group, algo, 1, 0.0005, False, 0.9) for algo in ALGORITHMS}


def _accumulated(rank, world, size):
    # shm: the buckets live in shared memory, and no_sync() accumulates in them.
    group = _group(size)
    return None if group is None else _train(group, "shm", 3, 25.0, False, 0.0)


def _naive(rank, world):
    from gradsync import comm

    return _train(comm.world(), "ring", 1, 0.0005, True, 0.9)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def _unused(rank, world, find_unused):
    import gradsync

    dp = gradsync.DataParallel(WithUnused(), find_unused_parameters=find_unused)
    x = torch.full((2, 4), float(rank + 1))
    try:
        dp(x).sum().backward()
    except RuntimeError as exc:
        return ("error", str(exc))
    grads = {name: (p.grad.tolist() if p.grad is not None else None)
             for name, p in dp.module.named_parameters()}
    # A second step must work too: the state was reset.
    dp(x).sum().backward()
    return ("ok", grads)


def _state_dict(rank, world):
    import gradsync

    dp = gradsync.DataParallel(nn.Linear(2, 2))
    return sorted(dp.state_dict())


def _mismatched(rank, world):
    import gradsync

    torch.manual_seed(0)
    model = nn.Linear(4, 3 if rank == 0 else 5)
    try:
        gradsync.DataParallel(model)
    except gradsync.comm.CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


# Error paths last: a check that raises ends the list on its rank.
CHECKS = [*((f"algorithms {size}", _every_algorithm, (size,)) for size in (1, 2, 3)),
          *((f"no_sync {size}", _accumulated, (size,)) for size in (2, 3)),
          ("naive", _naive, ()),
          ("state_dict", _state_dict, ()),
          ("unused named", _unused, (False,)),
          ("unused found", _unused, (True,)),
          ("mismatched", _mismatched, ())]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, WORLD, timeout=170)


def _close(results, want, rtol=1e-12, atol=1e-13):
    for rank_params in results:
        for got, ref in zip(rank_params, want):
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_matches_single_process_on_global_batch(world, world_size):
    results = world[f"algorithms {world_size}"][:world_size]
    want = reference(world_size, momentum=0.9)
    for algo in ALGORITHMS:
        per_rank = [r[algo] for r in results]
        _close(per_rank, want)
        for rank_params in per_rank[1:]:  # bitwise equal across ranks
            for a, b in zip(rank_params, per_rank[0]):
                assert np.array_equal(a, b), algo


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_no_sync_accumulation_matches_larger_global_batch(world, world_size):
    _close(world[f"no_sync {world_size}"][:world_size], reference(world_size, accumulate=3))


@pytest.mark.timeout(180)
def test_bucketed_matches_naive_oracle(world):
    bucketed = world["algorithms 3"][0]["ring"]
    for a, b in zip(bucketed, world["naive"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.timeout(180)
def test_unused_parameters_are_named_or_handled(world):
    for kind, message in world["unused named"]:
        assert kind == "error" and "unused.weight" in message and "unused.bias" in message
    for kind, grads in world["unused found"]:
        assert kind == "ok"
        assert grads["unused.weight"] == [[0.0] * 4] * 2
        # d(sum)/dW = sum over the batch of 2 rows of x = rank + 1; averaged over ranks:
        # 2 * mean(rank + 1) = WORLD + 1.
        assert grads["used.weight"] == [[float(WORLD + 1)] * 4] * 2


@pytest.mark.timeout(180)
def test_mismatched_models_name_ranks_and_shapes(world):
    for message in world["mismatched"]:
        assert "weight" in message and "rank 0" in message and "rank 1" in message
        assert "[3, 4]" in message and "[5, 4]" in message


@pytest.mark.timeout(180)
def test_state_dict_has_no_wrapper_prefix(world):
    assert world["state_dict"][0] == ["bias", "weight"]
