"""The Parameter-Server architecture: sync equals one process on the global batch; async and
ssp train and keep their bounds; malformed messages and lost peers give named errors.

One world of 5 processes runs every session (tests/distributed.py's run_checks), each on a
group of the ranks it needs, so the processes start once for the whole file.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, OPTIMIZERS, STEPS, global_batch, make_model
from tests.helpers import one_process_reference as reference

WORLD = 5


def _first(size):
    """A fresh group of world ranks 0..size-1 (None on the others); collective over the
    world, so every rank calls it."""
    from gradsync import comm

    return comm.new_group(list(range(size)))


def _ps_train(rank, world, servers, optimizer, consistency, staleness, model_fn=None,
              steps=STEPS, slow_worker=None, group=None):
    from gradsync import comm
    from gradsync.ps import PSArchitecture

    arch = PSArchitecture(servers, consistency, staleness, group or comm.world())
    model = (model_fn or make_model)()
    if not arch.is_worker:
        stats = arch.serve(model, OPTIMIZERS[optimizer])
        return ("server", stats)
    ps_model, opt = arch.prepare(model, OPTIMIZERS[optimizer])
    n, w = arch.num_workers, arch.worker_rank
    for step in range(steps):
        x, y = global_batch(step, n * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                               y[w * BATCH:(w + 1) * BATCH]).backward()
        if slow_worker == w:
            # A slow worker: extra compute per step, not a sleep.
            a = torch.randn(300, 300, dtype=torch.float64)
            for _ in range(20):
                a = torch.tanh(a @ a)
        opt.step()
    summary = arch.finish()
    return ("worker", [p.detach().numpy().copy() for p in model.parameters()], summary)


# (K servers, N workers): K and N in 1..3, leaving out (3, 3), which takes a sixth process
# and exercises nothing that (3, 2) and (2, 3) do not.
MATRIX = [(k, n) for k in (1, 2, 3) for n in (1, 2, 3) if k + n <= 5]
# Adam is elementwise like SGD's momentum: what sharding could break, the SGD matrix shows
# for every (K, N); Adam's state on a sharded server needs one K > 1 here (test_ps_pipeline
# runs it with K = 2, N = 3 and partitions) and the plain K = N = 1.
ADAM_MATRIX = [(1, 1), (3, 2)]


def _sync_matrix(rank, world, optimizer, matrix):
    """Every (K, N) of ``matrix``, each on a sub-group of this world."""
    out = {}
    for servers, workers in matrix:
        group = _first(servers + workers)
        if group is not None:
            out[(servers, workers)] = _ps_train(rank, world, servers, optimizer, "sync", 0,
                                                group=group)
    return out


def _on_first(rank, world, size, *args):
    """_ps_train(*args) on world ranks 0..size-1."""
    group = _first(size)
    return None if group is None else _ps_train(rank, world, *args, group=group)


class Uneven(nn.Module):
    """One large matrix, many tiny tensors, and a parameter that never gets a gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(12, 200)
        self.tiny = nn.ParameterList([nn.Parameter(torch.randn(1)) for _ in range(5)])
        self.head = nn.Linear(200, 3)
        self.unused = nn.Parameter(torch.randn(4))
        self.double()

    def forward(self, x):
        h = torch.tanh(self.big(x))
        for t in self.tiny:
            h = h * (1 + 0.1 * t)
        return self.head(h)


def few_tensors() -> nn.Module:
    """Two parameter tensors (weight 3x12, bias 3) for 3 servers: the weight is split over all
    of them and the last shard spans both tensors."""
    torch.manual_seed(0)
    return nn.Linear(12, 3).double()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("model_fn", [Uneven, few_tensors],
                         ids=["uneven", "more-servers-than-tensors"])
def test_uneven_shards_and_more_servers_than_tensors(world, model_fn):
    servers = 3
    want = reference(2, "sgd", model_fn)
    for result in world[model_fn.__name__][servers:]:
        for got, ref in zip(result[1], want):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


def test_sharding_is_balanced_by_bytes():
    from gradsync.ps.sharding import shard_layout

    params = [torch.empty(1000), *[torch.empty(1) for _ in range(10)]]
    layout = shard_layout(params, 4)
    sizes = [layout.shard_numel(k) for k in range(4)]
    assert sum(sizes) == 1010 and max(sizes) - min(sizes) <= 1
    # the big tensor is split over every server
    assert sorted({p.shard for p in layout.parts_of(0)}) == [0, 1, 2, 3]
    # several dtypes: balanced by bytes, every partition of one dtype; contiguous cuts the
    # vectors laid end to end, striped each vector
    parts = [torch.empty(600), torch.empty(300, dtype=torch.float64)]
    mixed = shard_layout(parts, 2, layout="contiguous")
    assert [layout_bytes(mixed, k) for k in range(2)] == [2400, 2400]
    assert [(p.dtype, p.numel) for p in mixed.parts(1)] == [(torch.float64, 300)]
    mixed = shard_layout(parts, 2)
    assert [layout_bytes(mixed, k) for k in range(2)] == [2400, 2400]
    assert [(p.dtype, p.numel) for p in mixed.parts(1)] == [(torch.float32, 300),
                                                            (torch.float64, 150)]


def layout_bytes(layout, k):
    return sum(p.nbytes for p in layout.parts(k))


def test_partitions_cover_each_shard_and_weights_follow_the_links():
    from gradsync.ps.sharding import LAYOUTS, partition_bytes_for, shard_layout

    params = [torch.empty(1000), torch.empty(24), torch.empty(7, dtype=torch.float64)]
    want = [(torch.float32, i) for i in range(1024)] + [(torch.float64, i) for i in range(7)]
    for name in LAYOUTS:
        layout = shard_layout(params, 3, partition_bytes=400, layout=name)  # <= 100 floats
        seen = []
        for k in range(3):
            parts = layout.parts(k)
            assert [p.index for p in parts] == list(range(len(parts)))
            flat = [(p.dtype.itemsize, p.start) for p in parts]  # float32's vector first
            assert flat == sorted(flat)
            assert all(p.nbytes <= 400 for p in parts) and len(parts) > 1
            seen += [(p.dtype, i) for p in parts for i in range(p.start, p.end)]
        assert sorted(seen, key=str) == sorted(want, key=str), name  # each element once
        # a server on a link 3x faster holds 3x the bytes
        fast = shard_layout([torch.empty(4000)], 2, weights=[3e9, 1e9], layout=name)
        assert [fast.shard_numel(k) for k in range(2)] == [3000, 1000], name
    assert partition_bytes_for(None) == 1 << 20
    assert partition_bytes_for(25e6) == 125_000  # 200 Mbit/s: 5 ms
    assert partition_bytes_for(1e12) == 4 << 20


def test_striped_layout_deals_partitions_in_turn():
    from gradsync.ps.sharding import shard_layout

    # 1200 float32 per server in partitions of 100 elements: 12 each, dealt 0, 1, 2, 0, ...
    layout = shard_layout([torch.empty(3600)], 3, partition_bytes=400)
    contiguous = shard_layout([torch.empty(3600)], 3, partition_bytes=400, layout="contiguous")
    assert [layout.shard_numel(k) for k in range(3)] == [contiguous.shard_numel(k)
                                                         for k in range(3)] == [1200] * 3
    order = sorted((p for k in range(3) for p in layout.parts(k)), key=lambda p: p.start)
    assert [p.shard for p in order] == [0, 1, 2] * 12 and {p.numel for p in order} == {100}
    assert [p.shard for p in contiguous.parts_of(0)] == [2] * 12 + [1] * 12 + [0] * 12
    # a parameter's partitions are pushed the last flat ones first, every server's in turn
    assert [(p.shard, p.start) for p in layout.parts_of(0)][:4] == [(2, 3500), (1, 3400),
                                                                    (0, 3300), (2, 3200)]


def _checkpoint_and_resume(rank, world, optimizer, cut):
    """Sync PS with Adam/SGD on world ranks 0-2: train STEPS steps taking a checkpoint at
    ``cut``, then start a fresh server from that checkpoint and run the steps after ``cut``
    again."""
    from gradsync.ps import PSArchitecture

    group = _first(3)
    if group is None:
        return None
    saved = {}

    def run(start, restored, save):
        arch = PSArchitecture(1, "sync", 0, group)
        model = make_model()
        if not arch.is_worker:
            arch.serve(model, OPTIMIZERS[optimizer], save=save, restored=restored)
            return None
        ps_model, opt = arch.prepare(model, OPTIMIZERS[optimizer], start_step=start)
        n, w = arch.num_workers, arch.worker_rank
        for step in range(start, STEPS):
            x, y = global_batch(step, n * BATCH)
            opt.zero_grad()
            nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                                   y[w * BATCH:(w + 1) * BATCH]).backward()
            opt.step()
            if step + 1 == cut and save is not None:
                assert ps_model.checkpoint(cut)
        arch.finish()
        return [p.detach().clone() for p in model.parameters()]

    straight = run(0, None, lambda step, state: saved.update({step: state}))
    resumed = run(cut, saved.get(cut), None)
    if rank == 0:
        return saved[cut]["step"], saved[cut]["version"], len(saved)
    return all(torch.equal(a, b) for a, b in zip(straight, resumed))


# Malformed messages, and a sync server that one stops: test_ps_protocol.py, case by case.
CHECKS = [("sync sgd", _sync_matrix, ("sgd", MATRIX)),
          ("sync adam", _sync_matrix, ("adam", ADAM_MATRIX)),
          ("Uneven", _on_first, (5, 3, "sgd", "sync", 0, Uneven)),
          ("few_tensors", _on_first, (5, 3, "sgd", "sync", 0, few_tensors)),
          # server 0, workers 1-3; worker 0 (rank 1) is the slow one
          ("ssp", _on_first, (4, 1, "sgd", "ssp", 2, None, 30, 0)),
          ("async", _on_first, (4, 1, "sgd", "async", 2, None, 30, 0)),
          ("resume sgd", _checkpoint_and_resume, ("sgd", 4)),
          ("resume adam", _checkpoint_and_resume, ("adam", 4))]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, WORLD, timeout=170)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer, matrix", [("sgd", MATRIX), ("adam", ADAM_MATRIX)],
                         ids=["sgd", "adam"])
def test_sync_matches_single_process_for_every_k_and_n(world, optimizer, matrix):
    results = world[f"sync {optimizer}"]
    for servers, workers in matrix:
        want = reference(workers, optimizer)
        for rank in range(servers, servers + workers):
            role, params, summary = results[rank][(servers, workers)]
            assert role == "worker"
            for got, ref in zip(params, want):
                np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13,
                                           err_msg=f"K={servers} N={workers}")
            assert summary["max_staleness"] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("consistency,bounded", [("ssp", True), ("async", False)])
def test_ssp_bound_holds_with_a_slow_worker(world, consistency, bounded):
    staleness = 2
    stats = world[consistency][0][1]
    assert stats.updates == 3 * 30
    if bounded:
        # The slow worker drags the others: the lead reaches the bound and never passes it.
        assert stats.max_lead == staleness, stats
    else:
        assert stats.max_lead > staleness, stats  # without the bound the fast ones run away


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_resume_from_a_server_checkpoint_is_bitwise_exact(world, optimizer):
    results = world[f"resume {optimizer}"]
    assert results[0] == (4, 4, 1)  # saved once, at step 4, after 4 updates
    assert results[1] is True and results[2] is True


def test_checkpoint_requests_are_validated():
    from gradsync.ps.protocol import Header, Kind, Status, validate_push

    ask = Header(Kind.CHECKPOINT, step=5, shard=1)
    assert validate_push(ask, 1, 10, 4, None, checkpoints=True) == Status.OK
    assert validate_push(ask, 1, 10, 4, None) == Status.BAD_KIND  # this run saves nothing
    assert validate_push(ask, 1, 10, 3, None, checkpoints=True) == Status.STEP_OUT_OF_RANGE
    assert validate_push(ask, 0, 10, 4, None, checkpoints=True) == Status.WRONG_SHARD
