"""gradsync.horovod against closed-form expectations (sums of ``range(size)``, as Horovod's
and mpi4py's tests do) and DistributedOptimizer against one process on the global batch.

One world of 3 processes runs every check (tests/distributed.py's run_checks); the
process set {0, 2} is the sub-group. Float64 and plain SGD make the training comparison
tight: the only difference left is the order of additions in the average.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, STEPS, global_batch, make_model

WORLD = 3
DTYPES = [torch.float64, torch.float32, torch.int64, torch.int32]


def _raises(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{fn.__name__} did not raise")


# --- checks (run on every rank) -------------------------------------------------------------

def check_queries(rank, n):
    import gradsync.horovod as hvd

    hvd.init()  # the world exists already: a no-op
    hvd.init()
    return dict(initialized=hvd.is_initialized(), size=hvd.size(), rank=hvd.rank(),
                local=(hvd.local_size(), hvd.local_rank()),
                cross=(hvd.cross_size(), hvd.cross_rank()), gloo=hvd.gloo_enabled(),
                mpi=hvd.mpi_enabled(), threads=hvd.mpi_threads_supported(),
                homogeneous=hvd.is_homogeneous())


def check_allreduce(rank, n):
    """Rank r holds (r + 1) * base; each op against its closed form."""
    import gradsync.horovod as hvd

    base = torch.arange(1, 7).reshape(2, 3)
    total = n * (n + 1) // 2
    for dtype in DTYPES:
        t = (base * (rank + 1)).to(dtype)
        before = t.clone()
        want = {hvd.Sum: base * total, hvd.Min: base, hvd.Max: base * n,
                hvd.Product: base ** n * int(np.prod(range(1, n + 1)))}
        for op, expect in want.items():
            assert torch.equal(hvd.allreduce(t, op=op), expect.to(dtype)), (dtype, op)
        average = (base.double() * total / n).to(dtype)  # ints: truncated
        assert torch.equal(hvd.allreduce(t), average)
        assert torch.equal(hvd.allreduce(t, average=False), (base * total).to(dtype))
        assert torch.equal(t, before), "allreduce changed its input"
        if dtype.is_floating_point:
            got = hvd.allreduce(t, op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0)
            assert torch.allclose(got, (base * total * 1.5).to(dtype))
            got = hvd.allreduce(t, op=hvd.Average, postscale_factor=2.0)
            assert torch.allclose(got, (base * total * 2.0 / n).to(dtype))
    t = base.double() * (rank + 1)
    assert hvd.allreduce_(t, op=hvd.Sum) is t and torch.equal(t, base.double() * total)
    errors = [_raises(hvd.allreduce, t, op=hvd.Adasum),
              _raises(hvd.allreduce, t, average=True, op=hvd.Sum)]
    return errors


def check_async_and_grouped(rank, n):
    import gradsync.horovod as hvd

    total = n * (n - 1) / 2
    handles = [hvd.allreduce_async(torch.full((5,), float(rank + k)), op=hvd.Sum)
               for k in range(4)]
    assert all(isinstance(hvd.poll(h), bool) for h in handles)
    for k, h in enumerate(handles):
        assert torch.equal(hvd.synchronize(h), torch.full((5,), total + n * k))
        assert hvd.poll(h)
    t = torch.full((3,), float(rank))
    hvd.synchronize(hvd.allreduce_async_(t, op=hvd.Max))
    assert torch.equal(t, torch.full((3,), float(n - 1)))
    b = torch.full((4,), float(rank))
    assert torch.equal(hvd.synchronize(hvd.broadcast_async(b, root_rank=1)), torch.ones(4))
    mixed = [torch.full((2, 2), float(rank)), torch.full((3,), rank, dtype=torch.int64),
             torch.full((1,), float(rank) * 2)]
    out = hvd.grouped_allreduce(mixed, op=hvd.Sum)
    assert [o.tolist() for o in out] == [[[total] * 2] * 2, [int(total)] * 3, [total * 2]]
    assert mixed[0][0, 0].item() == rank  # the inputs are left as they were
    hvd.grouped_allreduce_(mixed, op=hvd.Average)
    assert mixed[0][0, 0].item() == total / n and mixed[1][0].item() == int(total) // n


def check_broadcast(rank, n):
    import gradsync.horovod as hvd

    for root in range(n):
        t = torch.arange(6.0).reshape(2, 3) * (rank + 1)
        got = hvd.broadcast(t, root_rank=root)
        assert torch.equal(got, torch.arange(6.0).reshape(2, 3) * (root + 1))
        assert torch.equal(t, torch.arange(6.0).reshape(2, 3) * (rank + 1))
        hvd.broadcast_(t, root_rank=root)
        assert torch.equal(t, got)


def check_allgather(rank, n):
    """Rank r holds r + 1 rows of value r: first dims differ."""
    import gradsync.horovod as hvd

    for dtype in DTYPES:
        t = torch.full((rank + 1, 2), rank, dtype=dtype)
        got = hvd.allgather(t)
        want = torch.cat([torch.full((r + 1, 2), r, dtype=dtype) for r in range(n)])
        assert torch.equal(got, want), (dtype, got)
    got = hvd.synchronize(hvd.allgather_async(torch.tensor([rank])))
    assert got.tolist() == list(range(n))
    bad = torch.zeros(2, 3 if rank == 1 else 2)
    return _raises(hvd.allgather, bad, name="bad")


def check_alltoall_reducescatter(rank, n):
    import gradsync.horovod as hvd

    # Rank r sends j + 1 rows to rank j, each row the pair (r, j).
    splits = [j + 1 for j in range(n)]
    rows = torch.tensor([[rank, j] for j in range(n) for _ in range(j + 1)])
    out, received = hvd.alltoall(rows, splits=splits)
    assert received.tolist() == [rank + 1] * n
    assert out.tolist() == [[r, rank] for r in range(n) for _ in range(rank + 1)]
    even = torch.arange(2 * n) + 100 * rank  # default splits: 2 rows each
    out, received = hvd.alltoall(even)
    assert received.tolist() == [2] * n
    assert out.tolist() == [100 * r + 2 * rank + k for r in range(n) for k in range(2)]
    # 7 rows over 3 ranks: 3, 2, 2.
    t = torch.arange(14.0).reshape(7, 2) * (rank + 1)
    counts = [7 // n + (1 if r < 7 % n else 0) for r in range(n)]
    start = sum(counts[:rank])
    full = torch.arange(14.0).reshape(7, 2) * (n * (n + 1) / 2)
    assert torch.equal(hvd.reducescatter(t, op=hvd.Sum), full[start:start + counts[rank]])
    assert torch.allclose(hvd.reducescatter(t), full[start:start + counts[rank]] / n)
    errors = [_raises(hvd.alltoall, rows, splits=[1] * n),
              _raises(hvd.reducescatter, torch.zeros(3 + rank, 2))]
    return errors


def check_process_set(rank, n):
    import gradsync.horovod as hvd

    evens = hvd.add_process_set([0, 2])
    if rank == 1:
        return _raises(hvd.allreduce, torch.ones(1), process_set=evens)
    t = torch.full((3,), float(rank))
    assert torch.equal(hvd.allreduce(t, op=hvd.Sum, process_set=evens), torch.full((3,), 2.0))
    assert torch.equal(hvd.allreduce(t, process_set=evens), torch.full((3,), 1.0))
    got = hvd.broadcast(t, root_rank=2, process_set=evens)  # a global rank
    assert torch.equal(got, torch.full((3,), 2.0))
    gathered = hvd.allgather(torch.full((rank // 2 + 1,), rank), process_set=evens)
    assert gathered.tolist() == [0, 2, 2]
    assert hvd.allgather_object({"r": rank}, process_set=evens) == [{"r": 0}, {"r": 2}]
    hvd.barrier(process_set=evens)
    assert evens.size() == 2 and evens.rank() == rank // 2
    return _raises(hvd.broadcast, t, root_rank=1, process_set=evens)


def check_barrier_join(rank, n):
    import gradsync.horovod as hvd

    hvd.barrier()
    return hvd.join()


def check_objects(rank, n):
    import gradsync.horovod as hvd

    obj = {"epoch": 3, 1: (0.5, float("inf")), "w": torch.arange(4, dtype=torch.float16),
           "nested": [None, True, "s"]} if rank == 1 else None
    got = hvd.broadcast_object(obj, root_rank=1)
    assert got["epoch"] == 3 and got[1] == (0.5, float("inf")) and got["nested"] == [
        None, True, "s"]
    assert torch.equal(got["w"], torch.arange(4, dtype=torch.float16))
    gathered = hvd.allgather_object({"rank": rank, "loss": rank / 3, "t": torch.ones(rank)})
    assert [g["rank"] for g in gathered] == list(range(n))
    assert [g["t"].shape[0] for g in gathered] == list(range(n))
    assert gathered[2]["loss"] == 2 / 3
    refused = [_raises(hvd.broadcast_object, object() if rank == 0 else None, root_rank=0),
               _raises(hvd.allgather_object, (lambda: 0) if rank == 2 else rank)]
    return refused


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
    errors = [_raises(hvd.DistributedOptimizer, sgd, op=hvd.Adasum),
              _raises(hvd.DistributedOptimizer, sgd, op=hvd.Sum, gradient_predivide_factor=2)]
    opt = hvd.DistributedOptimizer(sgd)
    x, y = global_batch(0, BATCH)
    nn.functional.mse_loss(model(x), y).backward()
    errors.append(_raises(nn.functional.mse_loss(model(x), y).backward))
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
    ("queries", check_queries, ()),
    ("allreduce", check_allreduce, ()),
    ("async_grouped", check_async_and_grouped, ()),
    ("broadcast", check_broadcast, ()),
    ("allgather", check_allgather, ()),
    ("alltoall_reducescatter", check_alltoall_reducescatter, ()),
    ("process_set", check_process_set, ()),
    ("barrier_join", check_barrier_join, ()),
    ("objects", check_objects, ()),
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
def test_queries(world):
    for rank, q in enumerate(world["queries"]):
        assert q == dict(initialized=True, size=WORLD, rank=rank, local=(WORLD, rank),
                         cross=(1, 0), gloo=True, mpi=False, threads=False, homogeneous=True)


@pytest.mark.timeout(150)
def test_allreduce_ops_scaling_and_errors(world):
    for adasum, both in world["allreduce"]:
        assert "Adasum is not supported" in adasum and adasum.startswith("ValueError")
        assert "either op= or the deprecated average=" in both


@pytest.mark.timeout(150)
def test_async_handles_grouped_and_broadcast(world):
    world["async_grouped"]
    world["broadcast"]


@pytest.mark.timeout(150)
def test_allgather_unequal_first_dims_and_mismatch_on_every_rank(world):
    for error in world["allgather"]:
        assert error.startswith("ValueError: allgather 'bad': the ranks' tensors differ")
        assert "rank 1: float32[2, 3]" in error and "rank 0: float32[2, 2]" in error


@pytest.mark.timeout(150)
def test_alltoall_and_reducescatter(world):
    for bad_splits, bad_shape in world["alltoall_reducescatter"]:
        assert "passed invalid arguments (splits must be" in bad_splits
        assert "shapes and dtypes must agree" in bad_shape


@pytest.mark.timeout(150)
def test_process_set(world):
    results = world["process_set"]
    assert "rank 1 is not in process set [0, 2]" in results[1]
    for r in (0, 2):
        assert "root_rank 1 is not in the process set [0, 2]" in results[r]


@pytest.mark.timeout(150)
def test_barrier_and_join(world):
    last = world["barrier_join"]
    assert len(set(last)) == 1 and 0 <= last[0] < WORLD


@pytest.mark.timeout(150)
def test_objects_travel_without_pickle_and_refusals_reach_every_rank(world):
    for bcast, gather in world["objects"]:
        assert bcast.startswith("TypeError: broadcast_object: rank 0 could not send")
        assert "cannot send object at obj" in bcast and "never pickle" in bcast
        assert "rank 2: cannot send function at obj" in gather


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
