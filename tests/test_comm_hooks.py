"""DataParallel's communication hooks: the contract (what a hook sees, what it returns), the
default hook against the built-in path, warm-up, and --compression's specs."""

from __future__ import annotations

import pytest

from gradsync.compress.spec import Compression, parse
from tests.distributed import run_workers


@pytest.mark.parametrize("spec, want", [
    ("none", Compression("none")), ("fp16", Compression("fp16")), ("bf16", Compression("bf16")),
    ("topk:0.01", Compression("topk", 0.01)), ("powersgd:2", Compression("powersgd", 2)),
])
def test_specs_parse(spec, want):
    assert parse(spec) == want and str(parse(spec)) == spec


@pytest.mark.parametrize("spec, needle", [
    ("topk:0", "between 0 and 1"), ("topk:1.5", "between 0 and 1"), ("topk", "needs a ratio"),
    ("topk:x", "needs a ratio"), ("powersgd:0", "rank >= 1"), ("powersgd:1.5", "rank >= 1"),
    ("fp16:2", "takes no argument"), ("gzip", "unknown compressor"),
])
def test_bad_specs_are_named(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse(spec)


def _model_and_data(rank):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 3))
    gen = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.randn(8, 20, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(4)]
    return model, batches


def _train(model, batches, dp):
    import torch

    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        if i == 1:  # one accumulated step: the hook sees the sum of two backwards
            with dp.no_sync():
                torch.nn.functional.cross_entropy(dp(x), y).backward()
        torch.nn.functional.cross_entropy(dp(x), y).backward()
        opt.step()
    # numpy, not tensors: the harness's queue would pass tensors by shared memory
    return [p.detach().numpy().copy() for p in model.parameters()]


def _hooks(rank, n):
    import torch

    from gradsync import DataParallel, comm
    from gradsync.compress import HookState, allreduce_hook
    from gradsync.compress.spec import make_hook

    model, batches = _model_and_data(rank)
    plain = _train(model, batches, DataParallel(model, bucket_cap_mb=0.001))

    seen = []

    def spy(state, bucket):
        seen.append((bucket.index(), bucket.is_last(), bucket.buffer().numel(),
                     [tuple(g.shape) for g in bucket.gradients()],
                     [tuple(p.shape) for p in bucket.parameters()]))
        return allreduce_hook(state, bucket)

    model, batches = _model_and_data(rank)
    dp = DataParallel(model, bucket_cap_mb=0.001)
    state = HookState(algorithm="native")
    dp.register_comm_hook(state, spy)
    hooked = _train(model, batches, dp)
    errors = []
    for call in (lambda: dp.register_comm_hook(state, spy),):
        try:
            call()
        except RuntimeError as exc:
            errors.append(str(exc))

    # A hook returning a torch Future holding [tensor], as DDP's do.
    def future_hook(state, bucket):
        fut = torch.futures.Future()
        buf = bucket.buffer().div_(n)
        comm.all_reduce(buf, algorithm="native")
        fut.set_result([buf.clone()])
        return fut

    model, batches = _model_and_data(rank)
    dp = DataParallel(model, bucket_cap_mb=0.001)
    dp.register_comm_hook(None, future_hook)
    futured = _train(model, batches, dp)

    # Warm-up: the first steps plain, then the inner hook (here one that sends nothing).
    def silent(state, bucket):
        return comm.Work(lambda: bucket.buffer().div_(n))

    model, batches = _model_and_data(rank)
    dp = DataParallel(model, bucket_cap_mb=0.001)
    warm_state, warm_hook = make_hook("none", warmup=2) or (None, None)
    assert warm_state is None
    from gradsync.compress.spec import WarmupState, warmup_hook

    dp.register_comm_hook(WarmupState(2, HookState(), silent, HookState()), warmup_hook)
    warmed = _train(model, batches, dp)
    return (plain, hooked, futured, warmed, seen[:len(dp.bucket_layout())], errors,
            state.stats.snapshot())


@pytest.mark.timeout(120)
def test_hooks_follow_ddps_contract():
    import numpy as np
    import torch

    results = run_workers(_hooks, 2, timeout=110)
    plain, hooked, futured, warmed, seen, errors, stats = results[0]
    # The default hook is the built-in path: bitwise the same parameters.
    assert all(np.array_equal(a, b) for a, b in zip(plain, hooked))
    assert all(np.array_equal(a, b) for a, b in zip(plain, futured))
    # A hook that sends nothing after 2 warm-up steps: the ranks drift apart, so it ran.
    assert not all(np.array_equal(a, b) for a, b in zip(warmed, results[1][3]))
    # What a hook sees: indices in launch order, the last flagged, views shaped like params.
    assert [s[0] for s in seen] == list(range(len(seen))) and seen[-1][1]
    assert not any(s[1] for s in seen[:-1])
    for _, _, numel, grads, params in seen:
        assert grads == params and numel == sum(torch.Size(g).numel() for g in grads)
    assert errors == ["a comm hook is already registered; register one only once"]
    assert stats["buckets"] == 4 * len(seen) and stats["bytes_sent"] == stats["bytes_dense"] > 0
    for r in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r[1], hooked))


def test_work_then_chains_like_a_future():
    from gradsync.comm import Work

    calls = []
    work = Work(lambda: calls.append("first") or 3)
    chained = work.then(lambda w: w.value() * 2)
    assert calls == [] and chained.wait() == 6 and calls == ["first"] and work.wait() == 3
