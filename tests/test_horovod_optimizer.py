"""gradsync.horovod's DistributedOptimizer against one process on the global batch, and
broadcast_parameters / broadcast_optimizer_state.

One world of 3 processes runs every check (tests/distributed.py's run_checks). Float64 and
plain SGD make the training comparison tight: the only difference left is the order of
additions in the average.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, STEPS, global_batch, make_model, raised

WORLD = 3


def check_broadcast_state(rank, n):
    import gradsync.horovod as hvd

    model = make_model(seed=rank)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (rank + 1))
    if rank == 0:  # only the root has state; the others' is empty
        x, y = global_batch(0, BATCH)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = opt.state_dict()
    return ([p.detach().numpy().copy() for p in model.parameters()],
            state["param_groups"][0]["lr"],
            [s["exp_avg"].numpy().copy() for s in state["state"].values()])


def _train(rank, n, accumulate=1, clip=None, **kwargs):
    """STEPS steps on this rank's share of the global batch, Horovod style."""
    import gradsync.horovod as hvd

    model = make_model(seed=rank)  # differs per rank: broadcast_parameters must fix it
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kwargs)
    for step in range(STEPS):
        x, y = global_batch(step, n * accumulate * BATCH)
        opt.zero_grad()
        for k in range(accumulate):  # the global batch is [micro-batch][rank][sample]
            lo = (k * n + rank) * BATCH
            nn.functional.mse_loss(model(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
        if clip is None:
            opt.step()
        else:
            opt.synchronize()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            with warnings.catch_warnings(), opt.skip_synchronize():
                warnings.simplefilter("error")  # no second synchronize, no warning
                opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def check_optimizer_errors(rank, n):
    import gradsync.horovod as hvd

    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = [raised(hvd.DistributedOptimizer, sgd, op=hvd.Adasum),
              raised(hvd.DistributedOptimizer, sgd, op=hvd.Sum, gradient_predivide_factor=2)]
    opt = hvd.DistributedOptimizer(sgd)
    x, y = global_batch(0, BATCH)
    nn.functional.mse_loss(model(x), y).backward()
    errors.append(raised(nn.functional.mse_loss(model(x), y).backward))
    opt.synchronize()  # leaves the world in step for the next check
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match="all-reduced twice"):
        opt.step()  # synchronize() before, no skip_synchronize(): Horovod warns too
    scheduler.step()
    assert sgd.param_groups[0]["lr"] == 0.05
    return errors


def _kw(name, **kwargs):
    return name, _train_kw, (kwargs,)


def _train_kw(rank, n, kwargs):
    return _train(rank, n, **kwargs)


def _fp16():
    import gradsync.horovod as hvd

    return hvd.Compression.fp16


CHECKS = [
    ("broadcast_state", check_broadcast_state, ()),
    _kw("train"),
    _kw("train_buckets", bucket_cap_mb=0.0002),
    _kw("train_groups", groups=2),
    _kw("train_predivide", gradient_predivide_factor=2.0),
    _kw("train_clip", clip=0.05),
    _kw("train_accumulate", accumulate=2, backward_passes_per_step=2),
    _kw("train_fp16", compression=_fp16()),
    ("optimizer_errors", check_optimizer_errors, ()),
]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, WORLD, timeout=120)


def reference(n=WORLD, accumulate=1, clip=None):
    """One process, SGD on the global batch of n * accumulate * BATCH; ``accumulate``
    passes are summed (Horovod's backward_passes_per_step), hence the factor."""
    model = make_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = global_batch(step, n * accumulate * BATCH)
        opt.zero_grad()
        (accumulate * nn.functional.mse_loss(model(x), y)).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def _close(per_rank, want, rtol=1e-12, atol=1e-12):
    for params in per_rank:
        for got, ref in zip(params, want):
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


@pytest.mark.timeout(150)
def test_broadcast_parameters_and_optimizer_state(world):
    results = world["broadcast_state"]
    for params, lr, exp_avg in results:
        assert lr == 0.01
        assert len(exp_avg) == len(results[0][2]) > 0
        for got, want in zip(params + exp_avg, results[0][0] + results[0][2]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", ["train", "train_buckets", "train_groups",
                                  "train_predivide"])
def test_distributed_optimizer_equals_one_process(world, name):
    _close(world[name], reference())


@pytest.mark.timeout(150)
def test_synchronize_clip_skip_synchronize(world):
    want = reference(clip=0.05)
    _close(world["train_clip"], want)
    # The clipping mattered: without it the parameters end elsewhere.
    assert max(np.abs(a - b).max() for a, b in zip(want, reference())) > 1e-3


@pytest.mark.timeout(150)
def test_backward_passes_per_step_sums_the_passes(world):
    _close(world["train_accumulate"], reference(accumulate=2))


@pytest.mark.timeout(150)
def test_fp16_compression_within_half_precision(world):
    results = world["train_fp16"]
    _close(results, reference(), rtol=0, atol=2e-3)
    for params in results[1:]:  # every rank holds the same parameters
        for got, ref in zip(params, results[0]):
            np.testing.assert_array_equal(got, ref)


@pytest.mark.timeout(150)
def test_distributed_optimizer_errors(world):
    for adasum, predivide, twice in world["optimizer_errors"]:
        assert "Adasum is not supported" in adasum
        assert "gradient_predivide_factor not supported with op != Average" in predivide
        assert "more than backward_passes_per_step times" in twice
