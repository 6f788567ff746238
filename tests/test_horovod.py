"""gradsync.horovod's queries, tensor collectives and objects against closed-form
expectations (sums of ``range(size)``, as Horovod's and mpi4py's tests do);
DistributedOptimizer and the state broadcasts are test_horovod_optimizer.py's.

One world of 3 processes runs every check (tests/distributed.py's run_checks); the
process set {0, 2} is the sub-group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_checks
from tests.helpers import raised

WORLD = 3
DTYPES = [torch.float64, torch.float32, torch.int64, torch.int32]


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
    errors = [raised(hvd.allreduce, t, op=hvd.Adasum),
              raised(hvd.allreduce, t, average=True, op=hvd.Sum)]
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
    return raised(hvd.allgather, bad, name="bad")


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
    errors = [raised(hvd.alltoall, rows, splits=[1] * n),
              raised(hvd.reducescatter, torch.zeros(3 + rank, 2))]
    return errors


def check_process_set(rank, n):
    import gradsync.horovod as hvd

    evens = hvd.add_process_set([0, 2])
    if rank == 1:
        return raised(hvd.allreduce, torch.ones(1), process_set=evens)
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
    return raised(hvd.broadcast, t, root_rank=1, process_set=evens)


def check_barrier_join(rank, n):
    """Uneven data: rank r has r + 1 batches. At batch k the n - k ranks still active sum
    (or average over all n) their tensors and gradients; the joined ranks add zeros."""
    import gradsync.horovod as hvd

    hvd.barrier()
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0))
    for k in range(rank + 1):
        active = n - k
        assert hvd.allreduce(torch.ones(4), op=hvd.Sum).tolist() == [active] * 4
        assert hvd.allreduce(torch.ones(2, dtype=torch.int64), op=hvd.Sum).tolist() == \
            [active] * 2
        opt.zero_grad()
        (w * (rank + 1)).sum().backward()      # gradient rank + 1 everywhere
        opt.synchronize()
        want = sum(r + 1 for r in range(k, n)) / n   # the active ranks' sum over all n
        assert torch.allclose(w.grad, torch.full((3,), want, dtype=torch.float64)), (k, w.grad)
    last = hvd.join()
    # Something a joined rank cannot stand in for: one error on every rank, world intact.
    refused = raised(hvd.join) if rank == 0 else raised(hvd.broadcast, torch.ones(1), 0)
    hvd.barrier()
    return last, refused


def check_elastic_sampler(rank, n):
    """10 samples in order over n ranks, padded from the start; after each rank records
    its first 2, the 10 - 2n left are cut again over the n ranks."""
    import gradsync.horovod as hvd

    def cut(left):
        total = -(-len(left) // n) * n
        return (left + left[:total - len(left)])[rank:total:n]

    sampler = hvd.elastic.ElasticSampler(list(range(10)), shuffle=False)
    assert list(sampler) == cut(list(range(10))) and len(sampler) == len(cut(list(range(10))))
    sampler.record_batch(0, 2)
    done = {i for r in range(n) for i in (list(range(10)) * 2)[r:r + 2 * n:n]}
    sampler.sync()
    assert sampler.processed == done
    assert list(sampler) == cut([i for i in range(10) if i not in done])
    state = sampler.state_dict()
    sampler.set_epoch(1)
    assert sampler.processed == set() and sampler.epoch == 1
    sampler.load_state_dict(state)
    assert list(sampler) == cut([i for i in range(10) if i not in done])


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
    refused = [raised(hvd.broadcast_object, object() if rank == 0 else None, root_rank=0),
               raised(hvd.allgather_object, (lambda: 0) if rank == 2 else rank)]
    return refused


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
    ("elastic_sampler", check_elastic_sampler, ()),
]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, WORLD, timeout=120)


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
def test_join_stands_in_with_zeros_and_returns_the_last_rank(world):
    for rank, (last, refused) in enumerate(world["barrier_join"]):
        assert last == WORLD - 1
        if rank == 0:
            assert "other than an all-reduce was started while this rank had" in refused
        else:
            assert "hvd.broadcast while 1 rank(s) have called hvd.join()" in refused


@pytest.mark.timeout(150)
def test_elastic_sampler_cuts_what_nobody_processed(world):
    world["elastic_sampler"]


@pytest.mark.timeout(150)
def test_objects_travel_without_pickle_and_refusals_reach_every_rank(world):
    for bcast, gather in world["objects"]:
        assert bcast.startswith("TypeError: broadcast_object: rank 0 could not send")
        assert "cannot send object at obj" in bcast and "never pickle" in bcast
        assert "rank 2: cannot send function at obj" in gather
