"""ShardedDataParallel (gradsync/zero/) against gradsync.DataParallel with a whole optimizer on
every rank, and stage 1 against torch's ZeroRedundancyOptimizer.

Float64 makes the comparison tight: the only difference left is the order of additions in
the average. The model has 115 parameters, which 2, 3 and 4 do not divide, and a tiny bucket
cap spreads it over two buckets (of 31 and 84 elements; one bucket of 115 is a variant). One
world of 4 processes runs every check (tests/distributed.py's run_checks); worlds of 2 and 3
are sub-groups of it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_checks
from tests.helpers import BATCH, IN, OUT, STEPS, global_batch

WORLD = 4
SIZES = (2, 3, 4)
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
              "adam": (torch.optim.Adam, {"lr": 0.01})}
TINY_CAP = 0.0002  # MiB, about 200 bytes: 2 buckets, of 31 (uneven) and 84 float64 elements


def _model(seed: int) -> nn.Module:
    """(b, IN) -> (b, OUT), float64, 115 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 7), nn.Tanh(), nn.Linear(7, OUT)).double()


class _Mixed(nn.Module):
    """A float64 layer and a float32 layer: buckets of two dtypes."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(IN, 7).double()
        self.b = nn.Linear(7, OUT)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).float()).double()


def _group(size):
    """The first ``size`` ranks as a group (None on the others); collective on the world."""
    from gradsync import comm

    return comm.world() if size == WORLD else comm.new_group(list(range(size)))


def _train(group, kind, opt_name, make=_model, accumulate=1, cap=TINY_CAP):
    """Parameters after STEPS steps; ``kind`` is "dp" or the stage number. Rank r's
    micro-batch k is rows (k * n + r) * BATCH of the step's global batch."""
    import gradsync

    rank = group.rank
    cls, defaults = OPTIMIZERS[opt_name]
    model = make(seed=rank)  # different init per rank: wrapping must copy rank 0's
    if kind == "dp":
        wrapped = gradsync.DataParallel(model, group=group, bucket_cap_mb=cap)
        opt = cls(wrapped.parameters(), **defaults)
    else:
        wrapped = gradsync.ShardedDataParallel(model, cls, stage=kind, group=group,
                                               bucket_cap_mb=cap, **defaults)
        opt = wrapped.optimizer
    _run(group, wrapped, opt, range(STEPS), accumulate)
    return _params(wrapped, model)


def _run(group, wrapped, opt, steps, accumulate=1):
    rank, n = group.rank, group.size
    for step in steps:
        x, y = global_batch(step, n * accumulate * BATCH)
        opt.zero_grad()
        for k in range(accumulate):
            lo = (k * n + rank) * BATCH
            with (wrapped.no_sync() if k < accumulate - 1 else nullcontext()):
                loss = nn.functional.mse_loss(wrapped(x[lo:lo + BATCH]), y[lo:lo + BATCH])
                (loss / accumulate).backward()
        opt.step()


def _params(wrapped, model):
    """Whole parameters as arrays; stage 3 holds only shards between steps, so its
    state_dict() gathers them (collective); stages 1-2's all-gather after the step runs
    until the next forward, so reading them by hand waits for it first."""
    if hasattr(wrapped, "wait_for_parameters"):
        wrapped.wait_for_parameters()
    full = wrapped.state_dict() if getattr(wrapped, "stage", 0) == 3 \
        else dict(model.named_parameters())
    return [full[name].detach().numpy().copy() for name, _ in model.named_parameters()]


def _stages(rank, world, size):
    """Every (stage or dp, optimizer) on a world of ``size``."""
    group = _group(size)
    if group is None:
        return None
    return {(kind, opt): _train(group, kind, opt)
            for kind in ("dp", 1, 2, 3) for opt in OPTIMIZERS}


def _variants(rank, world):
    """no_sync accumulation, one bucket per dtype, and mixed float64/float32 buckets."""
    from gradsync import comm

    g = comm.world()
    out = {}
    for kind in ("dp", 1, 2, 3):
        out["accumulate", kind] = _train(g, kind, "adam", accumulate=3)
        out["one bucket", kind] = _train(g, kind, "adam", cap=25.0)
        out["mixed", kind] = _train(g, kind, "adam", make=_Mixed)
    return out


def _torch_zero(rank, world, size):
    """Stage 1 and torch's ZeroRedundancyOptimizer, gradients averaged by hand."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    group = _group(size)
    if group is None:
        return None
    model = _model(seed=0)
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.Adam,
                                  process_group=group.pg, lr=0.01)
    for step in range(STEPS):
        x, y = global_batch(step, size * BATCH)
        opt.zero_grad()
        lo = group.rank * BATCH
        nn.functional.mse_loss(model(x[lo:lo + BATCH]), y[lo:lo + BATCH]).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group.pg)
            p.grad.div_(size)
        opt.step()
    return {"torch": [p.detach().numpy().copy() for p in model.parameters()],
            "stage 1": _train(group, 1, "adam")}


def _what_is_kept(rank, world):
    """Per stage: optimizer-state elements and gradient tensors this rank holds after a
    step (the shard's, not the model's)."""
    import gradsync

    out = {}
    for stage in (1, 2, 3):
        model = _model(0)
        sdp = gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=stage,
                                           bucket_cap_mb=TINY_CAP, lr=0.01)
        seen = []  # stage 3, before the last layer's forward: (first, last) layer's numel
        model[2].register_forward_pre_hook(
            lambda m, a: seen.append((model[0].weight.numel(), model[2].weight.numel())))
        x, y = global_batch(0, BATCH)
        nn.functional.mse_loss(sdp(x), y).backward()
        sdp.optimizer.step()  # Adam creates its state in the first step
        state = sum(t.numel() for s in sdp.optimizer.state.values() for t in s.values()
                    if t.dim() > 0)
        out[stage] = {"exp_avg+sq": state, "buckets": len(sdp.buckets),
                      "launched in backward": sdp.launched_during_backward,
                      "param grads": [p.grad is not None for p in sdp.module.parameters()],
                      "piece grads": sum(b.piece.grad.numel() for b in sdp.buckets
                                         if b.piece is not None),
                      "param bytes": _storage_bytes(model.parameters()),
                      "shard elements": sum(b.shard.numel() for b in sdp.buckets
                                            if b.shard is not None),
                      "seen in forward": seen}
        if stage == 3:
            g = sdp.gatherer
            out[stage]["gathers"] = (g.gathers, g.prefetched)
            with torch.no_grad():  # a forward outside autograd gathers and frees as well
                out[stage]["eval"] = sdp(x).numpy()
                full = _model(0)
                full.load_state_dict(sdp.state_dict())  # collective in stage 3
                out[stage]["eval full"] = full(x).numpy()
            out[stage]["param bytes after eval"] = _storage_bytes(model.parameters())
            sdp.load_state_dict(_model(5).state_dict())  # into the shards (collective)
            out[stage]["loaded"] = [t.numpy() for t in sdp.state_dict().values()]
    for stage in (2, 3):  # a bucket per parameter: more buckets than reduce-scatters kept
        sdp = gradsync.ShardedDataParallel(_model(0), torch.optim.Adam, stage=stage,
                                           bucket_cap_mb=1e-9, lr=0.01)
        held = []  # reduce-scatters in flight after each gradient (gradsync's hook first)
        for p in sdp.module.parameters():
            p.register_post_accumulate_grad_hook(lambda p: held.append(len(sdp._works)))
        nn.functional.mse_loss(sdp(x), y).backward()
        out[stage]["in flight"] = (len(sdp.buckets), max(held))
    return out


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (as benchmarks/bench_zero.py)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


def _sharded(group, stage, cap=TINY_CAP, seed=0):
    import gradsync

    model = _model(seed)
    return model, gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=stage,
                                               group=group, bucket_cap_mb=cap, lr=0.01)


def _resume_same_world(rank, world):
    """Per stage: 5 steps, save, 5 more steps; and a fresh wrapper (another init) that
    loads the checkpoint and takes the same 5 steps. Adam, world 4."""
    from gradsync import comm

    g, out, half = comm.world(), {}, STEPS // 2
    for stage in (1, 2, 3):
        where = Path(os.environ["ZERO_CKPT"]) / f"same-{stage}"
        model, sdp = _sharded(g, stage)
        _run(g, sdp, sdp.optimizer, range(half))
        sdp.save_sharded(where)
        _run(g, sdp, sdp.optimizer, range(half, STEPS))
        fresh_model, fresh = _sharded(g, stage, seed=7)
        fresh.load_sharded(where)
        _run(g, fresh, fresh.optimizer, range(half, STEPS))
        out[stage] = {"uninterrupted": _params(sdp, model),
                      "resumed": _params(fresh, fresh_model)}
    return out


def _reshard(rank, world, save_stage, load_stage, size):
    """5 steps of ``save_stage`` on 4 ranks, saved; loaded into ``load_stage`` on ``size``
    ranks (another layout: stage 3 buckets per layer, stages 1-2 by the cap), 5 more steps;
    against DataParallel on 4 ranks, then on ``size`` (model and Adam state carried over)."""
    import gradsync
    from gradsync import comm
    from gradsync.zero import full_state_dict

    where, half = Path(os.environ["ZERO_CKPT"]) / f"reshard-{save_stage}", STEPS // 2
    model, sdp = _sharded(comm.world(), save_stage)
    _run(comm.world(), sdp, sdp.optimizer, range(half))
    sdp.save_sharded(where)
    saved = _params(sdp, model)
    dp_model = _model(rank)
    dp = gradsync.DataParallel(dp_model, bucket_cap_mb=TINY_CAP)
    dp_opt = torch.optim.Adam(dp.parameters(), lr=0.01)
    _run(comm.world(), dp, dp_opt, range(half))
    group = _group(size)
    if group is None:
        return None
    new_model, new = _sharded(group, load_stage, cap=25.0, seed=3)
    new.load_sharded(where)
    _run(group, new, new.optimizer, range(half, STEPS))
    dp2_model = _model(0)
    dp2_model.load_state_dict(dp_model.state_dict())
    dp2 = gradsync.DataParallel(dp2_model, group=group, bucket_cap_mb=TINY_CAP)
    dp2_opt = torch.optim.Adam(dp2.parameters(), lr=0.01)
    dp2_opt.load_state_dict(dp_opt.state_dict())
    _run(group, dp2, dp2_opt, range(half, STEPS))
    plain = _model(11)  # for serving: whole parameters, no process group needed
    plain.load_state_dict(full_state_dict(where))
    return {"resharded": _params(new, new_model), "dp": _params(dp2, dp2_model),
            "saved": saved, "plain": [p.detach().numpy() for p in plain.parameters()]}


CHECKS = [*((f"stages {size}", _stages, (size,)) for size in SIZES),
          ("variants", _variants, ()),
          *((f"torch zero {size}", _torch_zero, (size,)) for size in SIZES),
          ("kept", _what_is_kept, ()),
          ("resume", _resume_same_world, ()),
          ("reshard 3 -> 3", _reshard, (3, 3, 2)),
          ("reshard 2 -> 3", _reshard, (2, 3, 3)),
          ("reshard 3 -> 1", _reshard, (3, 1, 3))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("zero-checkpoints")


@pytest.fixture(scope="module")
def world(checkpoints):
    return run_checks(CHECKS, WORLD, timeout=170, env={"ZERO_CKPT": str(checkpoints)})


def _close(got, want, rtol=1e-12, atol=1e-13):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("size", SIZES)
def test_stages_match_data_parallel_to_1e_12(world, size):
    results = world[f"stages {size}"][:size]
    for opt in OPTIMIZERS:
        want = results[0]["dp", opt]
        for stage in (1, 2, 3):
            for rank_result in results:
                _close(rank_result[stage, opt], want)
            for a, b in zip(results[-1][stage, opt], results[0][stage, opt]):
                assert np.array_equal(a, b), (stage, opt)  # ranks agree bit for bit


@pytest.mark.timeout(180)
def test_no_sync_one_bucket_and_mixed_dtypes_match_data_parallel(world):
    for rank_result in world["variants"]:
        for stage in (1, 2, 3):
            _close(rank_result["accumulate", stage], rank_result["accumulate", "dp"])
            _close(rank_result["one bucket", stage], rank_result["one bucket", "dp"])
            got, want = rank_result["mixed", stage], rank_result["mixed", "dp"]
            assert [a.dtype for a in got] == [np.float64] * 2 + [np.float32] * 2
            _close(got[:2], want[:2])
            _close(got[2:], want[2:], rtol=1e-5, atol=1e-6)  # float32 sums, another order


@pytest.mark.timeout(180)
@pytest.mark.parametrize("size", SIZES)
def test_stage_1_matches_torch_zero_redundancy_optimizer(world, size):
    for rank_result in world[f"torch zero {size}"][:size]:
        _close(rank_result["stage 1"], rank_result["torch"])


@pytest.mark.timeout(180)
def test_each_rank_keeps_only_its_shard(world):
    kept = world["kept"]
    total = sum(p.numel() for p in _model(0).parameters())  # 115
    for stage in (1, 2, 3):
        # Adam's two moments over the shards add up to the model, each element once.
        assert sum(k[stage]["exp_avg+sq"] for k in kept) == 2 * total
        assert sum(k[stage]["piece grads"] for k in kept) == total
        # Every bucket's collective started from the hooks, while backward ran.
        assert all(k[stage]["launched in backward"] == k[stage]["buckets"] == 2 for k in kept)
    assert all(all(k[1]["param grads"]) for k in kept)      # stage 1: whole gradients
    assert not any(any(k[2]["param grads"]) for k in kept)  # stage 2: only the pieces
    assert all(k[1]["param bytes"] == k[2]["param bytes"] == 8 * total + 8 for k in kept)
    # Stages 2-3 wait for older reduce-scatters during backward (each holds a staging copy
    # of its bucket), not all at its end: 4 buckets, at most IN_FLIGHT in flight.
    from gradsync.zero.sharded import IN_FLIGHT
    assert all(k[s]["in flight"] == (4, IN_FLIGHT) for k in kept for s in (2, 3))


@pytest.mark.timeout(180)
def test_stage_3_keeps_only_its_shard_of_the_parameters_at_rest(world):
    kept = [k[3] for k in world["kept"]]
    # Layers of 91 and 24 elements, padded to multiples of 4: 92 + 24, 29 + 6 per rank.
    assert [k["shard elements"] for k in kept] == [29] * WORLD
    for k in kept:
        assert not any(k["param grads"])
        assert k["param bytes"] == k["param bytes after eval"] == 0  # whole ones freed
        # Before the last layer's forward: the first layer freed, the last one gathered.
        assert k["seen in forward"] == [(0, 21)] * 2  # training forward, then eval
        # Each layer gathered for forward and again for backward; the second of each
        # pair started while the first computed.
        assert k["gathers"] == (4, 2)
        np.testing.assert_array_equal(k["eval"], k["eval full"])
        for a, b in zip(k["loaded"], _model(5).state_dict().values(), strict=True):
            np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.timeout(180)
def test_resume_from_a_sharded_checkpoint_is_bitwise_exact(world):
    for rank_result in world["resume"]:
        for stage in (1, 2, 3):
            got, want = rank_result[stage]["resumed"], rank_result[stage]["uninterrupted"]
            for a, b in zip(got, want, strict=True):
                assert np.array_equal(a, b), stage


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["reshard 3 -> 3", "reshard 2 -> 3", "reshard 3 -> 1"])
def test_a_checkpoint_of_4_ranks_resumes_on_fewer_and_loads_into_a_plain_model(world, case):
    results = world[case]
    size = 2 if case == "reshard 3 -> 3" else 3
    assert results[size:] == [None] * (WORLD - size)
    for rank_result in results[:size]:
        _close(rank_result["resharded"], rank_result["dp"])
        for a, b in zip(rank_result["plain"], rank_result["saved"], strict=True):
            assert np.array_equal(a, b)  # the whole parameters, exactly


@pytest.mark.timeout(180)
def test_an_altered_or_unfinished_checkpoint_is_refused(world, checkpoints, tmp_path):
    from gradsync.checkpoint import CheckpointError
    from gradsync.zero import full_state_dict

    src = checkpoints / "same-3"
    altered = tmp_path / "altered"
    shutil.copytree(src, altered)
    shard = altered / "shard-00002-of-00004.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        full_state_dict(altered)
    (altered / "meta.json").unlink()  # what a save that died before its commit leaves
    with pytest.raises(CheckpointError, match="missing"):
        full_state_dict(altered)
    assert not list(src.glob("*.tmp"))  # every file renamed into place
