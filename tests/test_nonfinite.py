"""NaN and Inf gradients in DataParallel: found, attributed to the rank that sent them, and
stopped on (the default) or skipped; the skipped step leaves parameters and optimizer alone."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_checks


def _step_with_poison(rank: int, world_size: int, nonfinite: str, poison_rank: int,
                      value: float):
    """Two steps; at step 1 ``poison_rank`` feeds ``value`` into its input. Returns the
    error text (or None), the parameters after the poisoned step, and the skip count."""
    import gradsync
    from gradsync import comm
    from gradsync.allreduce import NonFiniteGradientError

    torch.manual_seed(0)
    model = gradsync.DataParallel(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
                                                      torch.nn.Linear(3, 2)),
                                  nonfinite=nonfinite, bucket_cap_mb=1e-5)  # several buckets
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    error, before = None, None
    for step in range(2):
        comm.set_step(step)
        x = torch.full((5, 4), float(rank + 1))
        if step == 1:
            before = [p.detach().clone() for p in model.parameters()]
            if rank == poison_rank:
                x[2, 1] = value
        opt.zero_grad()
        try:
            model(x).sum().backward()
        except NonFiniteGradientError as exc:
            error = str(exc)
            break
        opt.step()
    after = [p.detach().clone() for p in model.parameters()]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    return error, unchanged, model.stats.skipped_steps


# One world of 3 for every case; a stopped step raises on every rank alike, so the world
# goes on to the next case.
CHECKS = [("nan", _step_with_poison, ("error", 2, float("nan"))),
          ("inf", _step_with_poison, ("error", 2, float("inf"))),
          ("skip", _step_with_poison, ("skip", 0, float("nan")))]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, 3, timeout=110)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_gradient_names_rank_and_step(world, value):
    for error, _, _ in world[value]:  # every rank stops at the same step with the same story
        assert error is not None and "from rank 2 at step 1" in error, error
        assert "0.weight" in error and "--on-nonfinite skip" in error, error


@pytest.mark.timeout(120)
def test_skip_leaves_the_parameters_and_counts_the_step(world):
    for error, unchanged, skipped in world["skip"]:
        assert error is None and unchanged and skipped == 1


def test_unknown_policy_is_refused():
    from gradsync.allreduce.nonfinite import NONFINITE_POLICIES

    assert NONFINITE_POLICIES == ("error", "skip")
    with pytest.raises(ValueError, match="nonfinite policy 'warn'"):
        import gradsync

        gradsync.DataParallel(torch.nn.Linear(2, 2), nonfinite="warn")


@pytest.mark.timeout(10)
def test_all_finite_is_exact_where_a_plain_sum_overflows():
    from gradsync.comm import all_finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        big = torch.finfo(dtype).max
        t = torch.full((1000,), big / 2, dtype=dtype)   # finite, but its sum is Inf
        assert all_finite(t)
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[537] = bad
            assert not all_finite(u), (dtype, bad)
            v = torch.zeros(1000, dtype=dtype)
            v[3] = bad
            assert not all_finite(v), (dtype, bad)
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
