"""The Parameter-Server architecture: sync equals one process on the global batch; async and
ssp train and keep their bounds; malformed messages and lost peers give named errors."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers
from tests.test_data_parallel import BATCH, STEPS, global_batch, make_model

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def reference(workers: int, optimizer: str, model_fn=make_model):
    """One process on the global batch of ``workers`` x BATCH."""
    model = model_fn()
    opt = OPTIMIZERS[optimizer](model.parameters())
    for step in range(STEPS):
        x, y = global_batch(step, workers * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


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


def _sync_matrix(rank, world, optimizer):
    """Every (K, N) of MATRIX, each on a sub-group of this world of 5: one start-up instead
    of eight."""
    from gradsync import comm

    out = {}
    for servers, workers in MATRIX:
        group = comm.new_group(list(range(servers + workers)))
        if group is not None:
            out[(servers, workers)] = _ps_train(rank, world, servers, optimizer, "sync", 0,
                                                group=group)
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_matches_single_process_for_every_k_and_n(optimizer):
    results = run_workers(_sync_matrix, 5, optimizer, timeout=170)
    for servers, workers in MATRIX:
        want = reference(workers, optimizer)
        for rank in range(servers, servers + workers):
            role, params, summary = results[rank][(servers, workers)]
            assert role == "worker"
            for got, ref in zip(params, want):
                np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13,
                                           err_msg=f"K={servers} N={workers}")
            assert summary["max_staleness"] == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("consistency,bounded", [("ssp", True), ("async", False)])
def test_ssp_bound_holds_with_a_slow_worker(consistency, bounded):
    staleness = 2
    results = run_workers(_ps_train, 4, 1, "sgd", consistency, staleness, None, 30, 0)
    stats = results[0][1]
    assert stats.updates == 3 * 30
    if bounded:
        # The slow worker drags the others: the lead reaches the bound and never passes it.
        assert stats.max_lead == staleness, stats
    else:
        assert stats.max_lead > staleness, stats  # without the bound the fast ones run away


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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model_fn", [Uneven, few_tensors],
                         ids=["uneven", "more-servers-than-tensors"])
def test_uneven_shards_and_more_servers_than_tensors(model_fn):
    servers = 3
    results = run_workers(_ps_train, servers + 2, servers, "sgd", "sync", 0, model_fn)
    want = reference(2, "sgd", model_fn)
    for result in results[servers:]:
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
    # several dtypes: balanced by bytes, every partition of one dtype
    mixed = shard_layout([torch.empty(600), torch.empty(300, dtype=torch.float64)], 2)
    assert [layout_bytes(mixed, k) for k in range(2)] == [2400, 2400]
    assert [(p.dtype, p.numel) for p in mixed.parts(1)] == [(torch.float64, 300)]


def layout_bytes(layout, k):
    return sum(p.nbytes for p in layout.parts(k))


def test_partitions_cover_each_shard_and_weights_follow_the_links():
    from gradsync.ps.sharding import partition_bytes_for, shard_layout

    params = [torch.empty(1000), torch.empty(24), torch.empty(7, dtype=torch.float64)]
    layout = shard_layout(params, 3, partition_bytes=400)  # 100 float32 elements at most
    seen = []
    for k in range(3):
        parts = layout.parts(k)
        assert [p.index for p in parts] == list(range(len(parts)))
        assert all(p.nbytes <= 400 for p in parts) and len(parts) > 1
        seen += [(p.dtype, i) for p in parts for i in range(p.start, p.end)]
    want = [(torch.float32, i) for i in range(1024)] + [(torch.float64, i) for i in range(7)]
    assert sorted(seen, key=str) == sorted(want, key=str)  # each element exactly once
    # a server on a link 3x faster holds 3x the bytes
    fast = shard_layout([torch.empty(4000)], 2, weights=[3e9, 1e9])
    assert [fast.shard_numel(k) for k in range(2)] == [3000, 1000]
    assert partition_bytes_for(None) == 1 << 20
    assert partition_bytes_for(25e6) == 125_000  # 200 Mbit/s: 5 ms
    assert partition_bytes_for(1e12) == 4 << 20


def _malformed(rank, world, consistency):
    from gradsync import comm
    from gradsync.ps import PSArchitecture, PSProtocolError
    from gradsync.ps.protocol import Header, Kind

    arch = PSArchitecture(1, consistency, 0, comm.world())
    model = make_model()
    if rank == 0:
        try:
            return ("server", arch.serve(model, OPTIMIZERS["sgd"]).rejected)
        except PSProtocolError as exc:
            return ("server-error", str(exc))
    ps_model, opt = arch.prepare(model, OPTIMIZERS["sgd"])
    if rank == 2:
        # A message claiming 7 elements for a shard that has many more.
        comm.send(Header(Kind.PUSH, step=0, shard=0, numel=7, sender=rank).encode(), 0)
        comm.send(torch.zeros(7, dtype=torch.float64), 0)
        try:
            ps_model._pushed = [True]  # noqa: SLF001 - no backward ran; wait for the answer
            opt.step()
        except PSProtocolError as exc:
            return ("rejected", str(exc))
        return ("accepted", "")
    try:
        for step in range(5):
            x, y = global_batch(step, BATCH)
            opt.zero_grad()
            nn.functional.mse_loss(ps_model(x), y).backward()
            opt.step()
        return ("worker", arch.finish()["dropped_workers"])
    except comm.CommError as exc:
        return ("worker-error", str(exc))


@pytest.mark.timeout(180)
def test_malformed_message_is_rejected_and_others_keep_going():
    results = run_workers(_malformed, 3, "async")
    assert results[0] == ("server", 1)
    assert results[2][0] == "rejected" and "payload size" in results[2][1], results[2]
    assert results[1] == ("worker", [2])


@pytest.mark.timeout(180)
def test_malformed_message_stops_a_sync_server_naming_the_sender():
    results = run_workers(_malformed, 3, "sync", expect_failure=True)
    ok, (kind, message) = results[0]
    assert kind == "server-error" and "rank 2" in message, message
    assert results[2][1][0] == "rejected"
    assert results[1][1][0] == "worker-error" and "rank 0" in results[1][1][1], results[1]


def _checkpoint_and_resume(rank, world, optimizer, cut):
    """Sync PS with Adam/SGD: train STEPS steps taking a checkpoint at ``cut``, then start a
    fresh server from that checkpoint and run the steps after ``cut`` again."""
    from gradsync import comm
    from gradsync.ps import PSArchitecture

    saved = {}

    def run(start, restored, save):
        arch = PSArchitecture(1, "sync", 0, comm.world())
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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_resume_from_a_server_checkpoint_is_bitwise_exact(optimizer):
    results = run_workers(_checkpoint_and_resume, 3, optimizer, 4)
    assert results[0] == (4, 4, 1)  # saved once, at step 4, after 4 updates
    assert results[1] is True and results[2] is True


def test_checkpoint_requests_are_validated():
    from gradsync.ps.protocol import Header, Kind, Status, validate_push

    ask = Header(Kind.CHECKPOINT, step=5, shard=1)
    assert validate_push(ask, 1, 10, 4, None, checkpoints=True) == Status.OK
    assert validate_push(ask, 1, 10, 4, None) == Status.BAD_KIND  # this run saves nothing
    assert validate_push(ask, 1, 10, 3, None, checkpoints=True) == Status.STEP_OUT_OF_RANGE
    assert validate_push(ask, 0, 10, 4, None, checkpoints=True) == Status.WRONG_SHARD
