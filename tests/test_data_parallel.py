"""DataParallel against one process on the global batch, against the naive version, and its
error paths. Float64 and plain SGD make the comparison tight: the only difference left is
the order of additions in the average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers

# 10 steps carry momentum and accumulation through several updates, with half the
# collectives of 20 (each one waits on the scheduler when the machine is busy).
STEPS, BATCH, IN, OUT = 10, 4, 12, 3


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, OUT)).double()


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return (torch.randn(size, IN, generator=g, dtype=torch.float64),
            torch.randn(size, OUT, generator=g, dtype=torch.float64))


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


def _train(rank, n, algorithm, accumulate, bucket_cap_mb, naive, momentum):
    import gradsync

    model = make_model(seed=rank)  # different init per rank: wrapping must copy rank 0's
    if naive:
        dp = gradsync.DataParallelNaive(model, algorithm=algorithm)
    else:
        dp = gradsync.DataParallel(model, algorithm=algorithm, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=momentum)
    for step in range(STEPS):
        x, y = global_batch(step, n * accumulate * BATCH)
        # Micro-batch k of rank r: the global batch is laid out [micro-batch][rank][sample].
        opt.zero_grad()
        for k in range(accumulate):
            lo = (k * n + rank) * BATCH
            ctx = dp.no_sync() if (k < accumulate - 1 and not naive) else _null()
            with ctx:
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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ["auto", "native", "ring", "tree", "halving_doubling",
                                       "reduce_broadcast"])
def test_matches_single_process_on_global_batch(world_size, algorithm):
    # A tiny bucket cap spreads the 5 tensors over several buckets launched during backward.
    results = run_workers(_train, world_size, algorithm, 1, 0.0005, False, 0.9)
    want = reference(world_size, momentum=0.9)
    for rank_params in results:
        for got, ref in zip(rank_params, want):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    for rank_params in results[1:]:  # bitwise equal across ranks
        for a, b in zip(rank_params, results[0]):
            assert np.array_equal(a, b)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_no_sync_accumulation_matches_larger_global_batch(world_size):
    # shm: the buckets live in shared memory, and no_sync() accumulates in them.
    results = run_workers(_train, world_size, "shm", 3, 25.0, False, 0.0)
    want = reference(world_size, accumulate=3)
    for rank_params in results:
        for got, ref in zip(rank_params, want):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.timeout(180)
def test_bucketed_matches_naive_oracle():
    bucketed = run_workers(_train, 3, "ring", 1, 0.0005, False, 0.9)
    naive = run_workers(_train, 3, "ring", 1, 0.0005, True, 0.9)
    for a, b in zip(bucketed[0], naive[0]):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def _unused(rank, n, find_unused):
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


@pytest.mark.timeout(180)
def test_unused_parameters_are_named_or_handled():
    for kind, message in run_workers(_unused, 2, False):
        assert kind == "error" and "unused.weight" in message and "unused.bias" in message
    for kind, grads in run_workers(_unused, 2, True):
        assert kind == "ok"
        assert grads["unused.weight"] == [[0.0] * 4] * 2
        # d(sum)/dW = sum over batch of x; averaged over ranks: 2 * mean(rank + 1) = 3.
        assert grads["used.weight"] == [[3.0] * 4] * 2


def _mismatched(rank, n):
    import gradsync

    torch.manual_seed(0)
    model = nn.Linear(4, 3 if rank == 0 else 5)
    try:
        gradsync.DataParallel(model)
    except gradsync.comm.CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(180)
def test_mismatched_models_name_ranks_and_shapes():
    for message in run_workers(_mismatched, 2):
        assert "weight" in message and "rank 0" in message and "rank 1" in message
        assert "[3, 4]" in message and "[5, 4]" in message


def _state_dict(rank, n):
    import gradsync

    dp = gradsync.DataParallel(nn.Linear(2, 2))
    return sorted(dp.state_dict())


@pytest.mark.timeout(180)
def test_state_dict_has_no_wrapper_prefix():
    assert run_workers(_state_dict, 2)[0] == ["bias", "weight"]
