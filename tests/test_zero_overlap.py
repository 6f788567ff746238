"""ShardedDataParallel stages 1-2 with the all-gather after ``step()`` left running into the
next forward (gradsync/zero/regather.py), stage 1 as a reduce-scatter during backward, and
the reduce-scatter of a group that spans hosts (gradsync's ring).

The model (float64, 115 parameters) gets a bucket per parameter (4 buckets: the last
layer's bias and weight, then the first layer's), so the order in which gathers are
launched and waited for is visible. One world of 3 processes (shards of 39, 39 and 37
elements) runs every check; the expectations hold for any world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, IN, OUT, STEPS, global_batch

WORLD = 3
PER_PARAM = 1e-9  # MiB: a bucket per parameter


def _model(seed: int = 0) -> nn.Module:
    """(b, IN) -> (b, OUT), float64, 115 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 7), nn.Tanh(), nn.Linear(7, OUT)).double()


def _sharded(stage, group=None, prefetch=True, seed=0, **kwargs):
    import gradsync

    model = _model(seed)
    return model, gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=stage,
                                               group=group, bucket_cap_mb=PER_PARAM,
                                               prefetch=prefetch, lr=0.01, **kwargs)


def _step(sdp, step, n, rank):
    x, y = global_batch(step, n * BATCH)
    sdp.optimizer.zero_grad()
    lo = rank * BATCH
    nn.functional.mse_loss(sdp(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
    sdp.optimizer.step()


def _whole(model) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def _overlap(rank, world):
    """Per stage: what is in flight after step(), zero_grad() and at each layer's forward;
    and the parameters against the same run with the gathers waited for in step()."""
    out = {}
    for stage in (1, 2):
        model, sdp = _sharded(stage)
        twin_model, twin = _sharded(stage, prefetch=False)
        regather = sdp.optimizer.regather
        for step in range(STEPS):
            _step(sdp, step, world, rank)
            _step(twin, step, world, rank)
        launched = list(regather._pending)
        after_step = regather.pending
        sdp.optimizer.zero_grad()
        after_zero_grad = regather.pending
        seen = []  # (after gradsync's own pre-hook) gathers still unwaited at each layer
        for i in (0, 2):
            model[i].register_forward_pre_hook(lambda m, a: seen.append(regather.pending))
        x, _ = global_batch(STEPS, BATCH)
        with torch.no_grad():
            got, want = sdp(x).numpy(), twin(x).numpy()
        out[stage] = {"launched": launched, "after step": after_step,
                      "after zero_grad": after_zero_grad, "seen": seen,
                      "after forward": regather.pending,
                      "twin after step": twin.optimizer.regather.pending,
                      "params": _whole(model), "twin params": _whole(twin_model),
                      "eval": got, "twin eval": want}
    return out


def _reads_wait(rank, world):
    """Right after step(): the wrapper's state_dict(), the module's, and a sharded
    checkpoint loaded into a fresh wrapper, each against a run that waited in step()."""
    out = {}
    for stage in (1, 2):
        model, sdp = _sharded(stage)
        _, twin = _sharded(stage, prefetch=False)

        def both(step):
            _step(sdp, step, world, rank)
            _step(twin, step, world, rank)
            return [t.numpy().copy() for t in twin.state_dict().values()]

        got, pending = {}, []  # gathers unwaited before and after each read
        want = {"wrapper": both(0)}
        pending.append(sdp.optimizer.regather.pending)
        got["wrapper"] = [t.numpy().copy() for t in sdp.state_dict().values()]
        pending.append(sdp.optimizer.regather.pending)
        want["module"] = both(1)
        pending.append(sdp.optimizer.regather.pending)
        got["module"] = [t.numpy().copy() for t in model.state_dict().values()]
        pending.append(sdp.optimizer.regather.pending)
        want["checkpoint"] = both(2)
        where = Path(os.environ["ZERO_CKPT"]) / f"overlap-{stage}"
        pending.append(sdp.optimizer.regather.pending)
        sdp.save_sharded(where)
        pending.append(sdp.optimizer.regather.pending)
        _, fresh = _sharded(stage, seed=9)
        fresh.load_sharded(where)
        got["checkpoint"] = [t.numpy().copy() for t in fresh.state_dict().values()]
        whole = twin.state_dict()  # the state of step 2, loaded right after step 3
        both(3)
        pending.append(sdp.optimizer.regather.pending)
        model.load_state_dict(whole)  # the module's own: must not race the gathers
        pending.append(sdp.optimizer.regather.pending)
        got["loaded"] = [t.numpy().copy() for t in whole.values()]  # (what it loaded)
        got["after load"] = [t.numpy().copy() for t in model.state_dict().values()]
        out[stage] = {"got": got, "want": want, "pending": pending}
    return out


def _stage_1_grads(rank, world):
    """After one backward of stage 1: each parameter's .grad, with the whole averaged
    gradient (DataParallel's) and this rank's local gradient divided by N."""
    import gradsync

    _, sdp = _sharded(1)
    x, y = global_batch(0, world * BATCH)
    lo = rank * BATCH
    nn.functional.mse_loss(sdp(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
    dp_model = _model(0)
    dp = gradsync.DataParallel(dp_model, bucket_cap_mb=PER_PARAM)
    nn.functional.mse_loss(dp(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
    local = _model(0)
    nn.functional.mse_loss(local(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
    position = {id(p): i for i, p in enumerate(sdp.module.parameters())}
    buckets = []
    for b in sdp.buckets:
        mine = torch.zeros(b.flat.numel(), dtype=torch.bool)
        mine[b.rank * b.k:(b.rank + 1) * b.k] = True
        index = [position[id(p)] for p in b.params]
        buckets.append({
            "grad": torch.cat([p.grad.reshape(-1) for p in b.params]).numpy(),
            "average": torch.cat([list(dp_model.parameters())[i].grad.reshape(-1)
                                  for i in index]).numpy(),
            "local / N": torch.cat([list(local.parameters())[i].grad.reshape(-1) / world
                                    for i in index]).numpy(),
            "mine": mine[:b.numel].numpy()})
    return buckets


def _across_hosts(rank, world):
    """A topology of one host per rank: the reduce-scatters run gradsync's ring; the
    parameters against DataParallel's and (stage 1) torch's ZeroRedundancyOptimizer; how
    many stage-1 reduce-scatters are in flight at most."""
    import gradsync
    import torch.distributed as dist
    from gradsync import comm
    from gradsync.comm.collectives import resolve_auto
    from torch.distributed.optim import ZeroRedundancyOptimizer

    out = {}
    for stage in (1, 2):
        group = comm.new_group(list(range(world)))  # a topology of its own
        model, sdp = _sharded(stage, group=group, topology=comm.Topology.uniform(world))
        held = []
        for p in sdp.module.parameters():  # after gradsync's hook: reduce-scatters held
            p.register_post_accumulate_grad_hook(lambda p: held.append(len(sdp._works)))
        for step in range(STEPS):
            _step(sdp, step, world, rank)
        sdp.wait_for_parameters()
        # what "auto" runs for the reduce-scatters on this group, and the all-gathers' name
        reduce_scatter = resolve_auto(group, "reduce_scatter", sdp.shard_algorithm).name
        out[stage] = {"algorithms": (reduce_scatter, sdp.shard_algorithm),
                      "params": _whole(model), "in flight": max(held)}
    dp_model = _model(0)
    dp = gradsync.DataParallel(dp_model, bucket_cap_mb=PER_PARAM)
    opt = torch.optim.Adam(dp.parameters(), lr=0.01)
    ref = _model(0)
    zero = ZeroRedundancyOptimizer(ref.parameters(), torch.optim.Adam,
                                   process_group=comm.world().pg, lr=0.01)
    lo = rank * BATCH
    for step in range(STEPS):
        x, y = global_batch(step, world * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(dp(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
        opt.step()
        zero.zero_grad()
        nn.functional.mse_loss(ref(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
        for p in ref.parameters():  # averaged by hand, as torch's own tests do
            dist.all_reduce(p.grad, group=comm.world().pg)
            p.grad.div_(world)
        zero.step()
    out["dp"], out["torch"] = _whole(dp_model), _whole(ref)
    return out


CHECKS = [("overlap", _overlap, ()), ("reads wait", _reads_wait, ()),
          ("stage 1 grads", _stage_1_grads, ()), ("across hosts", _across_hosts, ())]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    where = tmp_path_factory.mktemp("zero-overlap")
    return run_checks(CHECKS, WORLD, timeout=120, env={"ZERO_CKPT": str(where)})


def _close(got, want, rtol=1e-12, atol=1e-13):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _equal(got, want):
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.timeout(130)
def test_step_launches_the_gathers_and_each_layer_waits_for_its_own(world):
    for rank_result in world["overlap"]:
        for stage in (1, 2):
            r = rank_result[stage]
            # Forward order: the first layer's weight and bias (buckets 3, 2) first.
            assert r["launched"] == [3, 2, 1, 0]
            assert r["after step"] == r["after zero_grad"] == 4  # zero_grad does not wait
            # The first layer waited for its 2 buckets only; the last layer for the rest.
            assert r["seen"] == [2, 0]
            assert r["after forward"] == 0 and r["twin after step"] == 0
            _equal(r["params"], r["twin params"])  # the overlap changes no bit
            assert np.array_equal(r["eval"], r["twin eval"])


@pytest.mark.timeout(130)
def test_state_dicts_and_checkpoints_right_after_step_wait_for_the_gather(world):
    for rank_result in world["reads wait"]:
        for stage in (1, 2):
            r = rank_result[stage]
            for what in ("wrapper", "module", "checkpoint"):
                _equal(r["got"][what], r["want"][what])
            # load_state_dict() right after a step: the loaded values stay (no gather
            # finishing later overwrites them).
            _equal(r["got"]["after load"], r["got"]["loaded"])
            assert r["pending"] == [4, 0] * 4  # 4 buckets in flight; each read waited


@pytest.mark.timeout(130)
def test_stage_1_grad_holds_the_average_on_its_piece_and_the_local_gradient_elsewhere(world):
    for buckets in world["stage 1 grads"]:
        assert len(buckets) == 4
        for b in buckets:
            mine = b["mine"]
            np.testing.assert_allclose(b["grad"][mine], b["average"][mine],
                                       rtol=1e-12, atol=1e-14)
            assert np.array_equal(b["grad"][~mine], b["local / N"][~mine])
        assert sum(b["mine"].sum() for b in buckets) > 0
    # Every element is averaged on exactly one rank.
    owners = sum(np.concatenate([b["mine"] for b in buckets]).astype(int)
                 for buckets in world["stage 1 grads"])
    assert (owners == 1).all()


@pytest.mark.timeout(130)
def test_across_hosts_the_reduce_scatter_is_the_ring_and_the_values_hold(world):
    from gradsync.zero.sharded import IN_FLIGHT

    for rank_result in world["across hosts"]:
        for stage in (1, 2):
            r = rank_result[stage]
            assert r["algorithms"] == ("ring", "auto")
            _close(r["params"], rank_result["dp"])
            assert r["in flight"] == IN_FLIGHT  # 4 buckets, at most 2 reduce-scatters held
        _close(rank_result[1]["params"], rank_result["torch"])
