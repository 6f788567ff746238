"""The compressing comm hooks: fp16/bf16 casts against torch's own DDP hooks, a DDP hook
running unchanged on gradsync, the cast wrapper around top-k, top-k against its dense oracle
with error feedback, and convergence on digits-mlp.

Two ranks throughout (the machine has two cores): there a/2 + b/2 is the only order of
addition, so the sparse top-k exchange and its dense oracle agree bitwise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gradsync.compress.topk import TopKState, topk_count
from tests.distributed import run_checks
from tests.helpers import gradsync

STEPS, BATCH, IN, OUT = 20, 8, 16, 4
BUCKET_MB = 0.002  # ~500 float32 per bucket: several buckets on both DataParallels


def _numpy(obj):
    """Tensors as numpy arrays, through dicts, lists and tuples: torch's queue pickling
    shares tensors by file descriptor, which dies with the worker that returns them."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()  # numpy has no bf16
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy(v) for v in obj)
    return obj


def _tensors(obj):
    """The inverse of :func:`_numpy`, in the test process."""
    if hasattr(obj, "__array__") and not isinstance(obj, (int, float)):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj




def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, OUT))


def _train(rank, n, wrap, steps=STEPS, scale=1.0):
    """SGD for ``steps`` on rank's share of a fixed global batch per step; returns the flat
    parameters (P,) and the losses. ``scale``, a power of two, multiplies the loss and divides
    the learning rate: the same updates in float32, larger gradients in the hooks."""
    model = make_model()
    dp = wrap(model)
    opt = torch.optim.SGD(dp.parameters(), lr=0.2 / scale)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(n * BATCH, IN, generator=g)
        y = torch.randn(n * BATCH, OUT, generator=g)
        lo = rank * BATCH
        opt.zero_grad()
        loss = nn.functional.mse_loss(dp(x[lo:lo + BATCH]), y[lo:lo + BATCH])
        (loss * scale).backward()
        opt.step()
        losses.append(loss.item())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), losses


def _gradsync(state=None, hook=None):
    def wrap(model):
        import gradsync

        dp = gradsync.DataParallel(model, bucket_cap_mb=BUCKET_MB)
        if hook is not None:
            dp.register_comm_hook(state, hook)
        return dp
    return wrap


def _casts_vs_ddp(rank, n, name):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from gradsync import comm
    from gradsync.compress.cast import cast
    from gradsync.compress.spec import make_hook

    torch_hook = {"fp16": default_hooks.fp16_compress_hook,
                  "bf16": default_hooks.bf16_compress_hook}[name]

    def torch_cast_hook(state, bucket):
        # DDP refuses a hook *named* bf16_compress_hook unless CUDA and NCCL >= 2.10 are
        # there (distributed.py, _check_comm_hook); gloo reduces bf16 on the CPU all the same.
        return torch_hook(state, bucket)

    def ddp(model):
        dp = comm.reference.torch_ddp(model, comm.world(), bucket_cap_mb=BUCKET_MB)
        dp.register_comm_hook(None, torch_cast_hook)
        return dp

    # Gradients scaled by 2^10 (as mixed-precision training's loss scaling does): none then
    # lands among fp16's subnormals, the one place where DDP's cast-then-divide and our
    # divide-then-cast round differently; elsewhere halving commutes with rounding. Without
    # it, a one-ulp difference there flips later roundings and the runs drift apart by
    # lr * (one fp16 ulp of a gradient), as far as the comparison with float32 can see.
    def run(wrap):
        return _train(rank, n, wrap, scale=1024.0)[0]

    runs = {"plain": run(_gradsync()),
            "ours": run(_gradsync(*cast(name))),
            # --warmup-compression: PowerSGD's warm-up steps (all of this run) sent as casts.
            "warmup": run(_gradsync(*make_hook("powersgd:1", warmup=STEPS,
                                               warmup_compression=name))),
            "ddp": run(ddp),
            # DDP's hook itself on gradsync, with each state DDP accepts for it.
            "torch_hook_none": run(_gradsync(None, torch_hook)),
            "torch_hook_world": run(_gradsync(dist.group.WORLD, torch_hook))}
    return _numpy(runs)


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def cast_runs(request, world):
    return request.param, world[request.param]


@pytest.mark.timeout(180)
def test_casts_train_like_ddps_own_hooks(cast_runs):
    name, results = cast_runs
    for runs in results:
        # Elementwise casts, so DDP's other bucket layout changes nothing: bitwise equal.
        assert torch.equal(runs["ours"], runs["ddp"]), (runs["ours"] - runs["ddp"]).abs().max()
        # ... and the test can fail: rounding to half precision changed the parameters.
        assert not torch.allclose(runs["ours"], runs["plain"], rtol=1e-4, atol=1e-6), name
        # A compressor's warm-up steps with --warmup-compression are this very cast.
        assert torch.equal(runs["warmup"], runs["ours"]), name
    assert torch.equal(results[0]["ours"], results[1]["ours"])


@pytest.mark.timeout(180)
def test_ddps_hook_runs_unchanged_on_gradsync(cast_runs):
    name, results = cast_runs
    for runs in results:
        # torch's hook on gradsync is torch's hook on DDP, bitwise: same casts, same order.
        assert torch.equal(runs["torch_hook_none"], runs["ddp"]), name
        assert torch.equal(runs["torch_hook_world"], runs["ddp"]), name


def _wrapped_topk(rank, n):
    from gradsync.compress.cast import cast_wrapper
    from gradsync.compress.topk import topk

    state, hook = topk(0.1)
    params, losses = _train(rank, n, _gradsync(state, cast_wrapper("bf16", hook)), steps=30)
    residual_dtypes = {str(r.dtype) for r in state.residuals.values()}
    return _numpy((params, losses, residual_dtypes, state.stats.snapshot()))


@pytest.mark.timeout(180)
def test_bf16_around_topk_trains(world):
    results = world["bf16 around topk"]
    params, losses, dtypes, stats = results[0]
    assert torch.isfinite(params).all() and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert dtypes == {"torch.bfloat16"}  # the inner hook saw the bf16 bucket
    assert stats["bytes_sent"] < stats["bytes_dense"]
    assert torch.equal(params, results[1][0])  # bitwise the same model on every rank


def _bucket(index, buf):
    """A one-parameter bucket holding ``buf`` (numel,) as this rank's gradients."""
    from gradsync import comm
    from gradsync.compress import GradBucket

    return GradBucket(index, buf, [nn.Parameter(torch.empty_like(buf))], [0], True,
                      comm.world())


def _randn(numel, seed):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def _on_buckets(rank, n):
    """The hooks called on hand-made buckets: 5 steps of three buckets through topk_hook and
    naive_topk_hook on the same gradients, recording what this rank put into the
    all-gathers; top-k at ratio 1; the casts and the wrapper."""
    from gradsync import comm
    from gradsync.compress import topk as topk_module

    sent = []
    gather = comm.all_gather_async

    def spy(tensor_list, tensor, group=None):
        sent.append(tensor.clone())
        return gather(tensor_list, tensor, group=group)

    topk_module.comm.all_gather_async = spy  # this worker process only, until the end
    try:
        return _numpy(_buckets_through_hooks(rank, n, topk_module, sent))
    finally:
        topk_module.comm.all_gather_async = gather


def _buckets_through_hooks(rank, n, topk_module, sent):
    from gradsync.compress.cast import cast, cast_wrapper, naive_cast_average
    from gradsync.compress.default import HookState, allreduce_hook

    sparse = topk_module.TopKState(ratio=0.05)
    naive = topk_module.TopKState(ratio=0.05)
    sizes = (1000, 1, 200)  # a bucket of one element still sends it; 200 small integers tie
    out = {"sparse": [], "naive": [], "grads": {i: torch.zeros(s) for i, s in enumerate(sizes)},
           "sent": {i: torch.zeros(s) for i, s in enumerate(sizes)}}
    for step in range(5):
        for i, numel in enumerate(sizes):
            seed = 1000 * rank + 10 * step + i
            grads = _randn(numel, seed) if i < 2 else torch.randint(
                -3, 4, (numel,), generator=torch.Generator().manual_seed(seed)).float()
            a, b = _bucket(i, grads.clone()), _bucket(i, grads.clone())
            out["grads"][i] += a.buffer()
            del sent[:]
            out["sparse"].append(topk_module.topk_hook(sparse, a).wait().clone())
            out["naive"].append(topk_module.naive_topk_hook(naive, b).wait().clone())
            values, indices = sent
            out["sent"][i].index_add_(0, indices, values)
    out["residual"] = {i: r.clone() for i, r in sparse.residuals.items()}
    out["naive_residual"] = {i: r.clone() for i, r in naive.residuals.items()}
    out["stats"] = sparse.stats.snapshot()

    # ratio 1 sends everything: the plain average.
    everything = topk_module.TopKState(ratio=1.0)
    a, dense = _bucket(0, _randn(300, rank)), _bucket(0, _randn(300, rank))
    out["ratio_one"] = (topk_module.topk_hook(everything, a).wait().clone(),
                        allreduce_hook(HookState(), dense).wait().clone())

    # The casts against the one-process oracle, and the wrapper around the default hook
    # (torch's "fp16_compress_hook == fp16_compress_wrapper(allreduce_hook)").
    grads = [_randn(4000, r) for r in range(n)]
    for name in ("fp16", "bf16"):
        state, hook = cast(name)
        bucket, wrapped = _bucket(0, grads[rank].clone()), _bucket(0, grads[rank].clone())
        out[name] = (hook(state, bucket).wait().clone(), naive_cast_average(grads, name),
                     cast_wrapper(name, allreduce_hook)(HookState(), wrapped).wait().clone(),
                     state.stats.snapshot())
    return out


# One world of 2 for every distributed check; the first test to ask waits for all of them.
CHECKS = [("fp16", _casts_vs_ddp, ("fp16",)), ("bf16", _casts_vs_ddp, ("bf16",)),
          ("bf16 around topk", _wrapped_topk, ()), ("on buckets", _on_buckets, ())]


@pytest.fixture(scope="module")
def world():
    results = run_checks(CHECKS, 2, timeout=170)
    return {name: _tensors(results[name]) for name in results.names}


@pytest.fixture(scope="module")
def direct(world):
    return world["on buckets"]


@pytest.mark.timeout(180)
def test_topk_equals_its_dense_oracle(direct):
    for out in direct:
        for s, d in zip(out["sparse"], out["naive"]):
            assert torch.equal(s, d)
        for i, r in out["residual"].items():
            assert torch.equal(r, out["naive_residual"][i])
    # Bitwise the same average on every rank.
    for s0, s1 in zip(direct[0]["sparse"], direct[1]["sparse"]):
        assert torch.equal(s0, s1)


@pytest.mark.timeout(180)
def test_topk_error_feedback_loses_nothing(direct):
    for out in direct:
        for i, grads in out["grads"].items():
            # sum of what was sent + what is still held == sum of the gradients
            assert torch.allclose(out["sent"][i] + out["residual"][i], grads, atol=1e-5)
        assert out["residual"][1].abs().sum() == 0  # a one-element bucket sends its element
        # Integers add exactly: there the invariant holds bitwise.
        assert torch.equal(out["sent"][2] + out["residual"][2], out["grads"][2])


@pytest.mark.timeout(180)
def test_topk_stats_and_ratio_one(direct):
    n, ratio, elsize = 2, 0.05, 4
    stats = direct[0]["stats"]
    assert stats["buckets"] == 15 and stats["bytes_sent"] < stats["bytes_dense"]
    sent = 5 * (n - 1) * (50 + 1 + 10) * (elsize + 8)  # k = 50 of 1000, 1 of 1, 10 of 200
    dense = 5 * 2 * (n - 1) / n * (1000 + 1 + 200) * elsize
    assert stats["bytes_sent"] == sent and stats["bytes_dense"] == dense
    # Per big bucket, dense / sparse = (2/n) / (ratio * (1 + 8/elsize)).
    assert 2 * (n - 1) / n * 1000 * elsize / ((n - 1) * 50 * (elsize + 8)) == pytest.approx(
        (2 / n) / (ratio * (1 + 8 / elsize)))
    for out in direct:
        ours, plain = out["ratio_one"]
        assert torch.equal(ours, plain)


@pytest.mark.timeout(180)
def test_casts_match_the_oracle(direct):
    for out in direct:
        for name in ("fp16", "bf16"):
            ours, oracle, wrapped, stats = out[name]
            assert torch.equal(ours, oracle), name
            assert torch.equal(wrapped, ours), name
            assert stats["bytes_dense"] == 2 * stats["bytes_sent"] > 0
            assert stats["compress_s"] > 0
    assert torch.equal(direct[0]["fp16"][0], direct[1]["fp16"][0])


@pytest.mark.parametrize("numel, ratio, k", [(1, 0.001, 1), (1, 1.0, 1), (30, 0.1, 3),
                                             (7, 0.5, 4), (10, 1.0, 10), (1000, 0.001, 1),
                                             (1001, 0.001, 2), (0, 0.5, 0)])
def test_topk_count(numel, ratio, k):
    assert topk_count(numel, ratio) == k


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_topk_ratio_outside_range_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        TopKState(ratio=ratio)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_digits_mlp_converges_compressed(tmp_path):
    """The default job (20 epochs of digits-mlp on 2 workers) through the CLI with top-k, the
    lossy compressor: its error feedback still reaches the uncompressed run's >= 95 % test
    accuracy. (fp16 and bf16 need no run of their own: they train bitwise like torch's own
    DDP hooks above, and --compression reaches every compressor through the same spec.)"""
    run = gradsync("train", "--workload", "digits-mlp", "--compression", "topk:0.1",
                   "--no-progress", "--out", str(tmp_path), timeout=55)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compression"] == "topk:0.1"
    assert summary["eval_accuracy"] >= 0.95, summary["eval_accuracy"]
    assert summary["compression_ratio"] > 1.5
