"""ShardedDataParallel (gradsync/zero/) against gradsync.DataParallel with a whole optimizer on
every rank, and stage 1 against torch's ZeroRedundancyOptimizer.

Float64 makes the comparison tight: the only difference left is the order of additions in
the average. The model has 115 parameters, which 2, 3 and 4 do not divide, and a tiny bucket
cap spreads it over two buckets (of 31 and 84 elements; one bucket of 115 is a variant). One
world of 4 processes runs every check (tests/distributed.py's run_checks); worlds of 2 and 3
are sub-groups of it.
"""

from __future__ import annotations

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

    rank, n = group.rank, group.size
    cls, defaults = OPTIMIZERS[opt_name]
    model = make(seed=rank)  # different init per rank: wrapping must copy rank 0's
    if kind == "dp":
        wrapped = gradsync.DataParallel(model, group=group, bucket_cap_mb=cap)
        opt = cls(wrapped.parameters(), **defaults)
    else:
        wrapped = gradsync.ShardedDataParallel(model, cls, stage=kind, group=group,
                                               bucket_cap_mb=cap, **defaults)
        opt = wrapped.optimizer
    for step in range(STEPS):
        x, y = global_batch(step, n * accumulate * BATCH)
        opt.zero_grad()
        for k in range(accumulate):
            lo = (k * n + rank) * BATCH
            with (wrapped.no_sync() if k < accumulate - 1 else _null()):
                loss = nn.functional.mse_loss(wrapped(x[lo:lo + BATCH]), y[lo:lo + BATCH])
                (loss / accumulate).backward()
        opt.step()
    # Stage 3 holds only shards between steps: its state_dict() gathers the parameters.
    full = wrapped.state_dict() if kind == 3 else dict(model.named_parameters())
    return [full[name].detach().numpy().copy() for name, _ in model.named_parameters()]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
    return out


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (as benchmarks/bench_zero.py)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


CHECKS = [*((f"stages {size}", _stages, (size,)) for size in SIZES),
          ("variants", _variants, ()),
          *((f"torch zero {size}", _torch_zero, (size,)) for size in SIZES),
          ("kept", _what_is_kept, ())]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, WORLD, timeout=170)


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


def test_unknown_stage_is_refused():
    import gradsync

    with pytest.raises(ValueError, match="stage must be one of"):
        gradsync.ShardedDataParallel(_model(0), stage=4)
