"""Compressed pushes of the Parameter Server: fp16/bf16 stay close to plain sync PS (and differ
from it), top-k keeps the error-feedback invariant, trains, and pushes the bytes its closed
form says; malformed sparse pushes are refused naming the sender; powersgd is refused.

The distributed runs share one world of 3 processes per test, each session on a fresh group
of the same ranks, so the processes start once.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers
from tests.helpers import BATCH, OPTIMIZERS, STEPS, LogCapture, global_batch, make_model
from tests.helpers import one_process_reference as reference

NUMEL = 531  # make_model's parameters: 12*16+16 + 16*16+16 + 16*3+3
FIT_STEPS = 30
BAD = 2  # the bad worker's rank in the malformed sessions; the good one is 1, the server 0


def _train(rank, group, servers, compression, warmup=0, steps=STEPS, fixed=False):
    """One sync PS session; a worker returns (params, summary, losses), a server its stats.
    ``fixed``: every step on the batch of step 0 (a loss that can go down)."""
    from gradsync.ps import PSArchitecture

    arch = PSArchitecture(servers, "sync", 0, group, compression=compression,
                          compression_warmup=warmup)
    model = make_model()
    if not arch.is_worker:
        return arch.serve(model, OPTIMIZERS["sgd"])
    ps_model, opt = arch.prepare(model, OPTIMIZERS["sgd"])
    n, w, losses = arch.num_workers, arch.worker_rank, []
    for step in range(steps):
        x, y = global_batch(0 if fixed else step, n * BATCH)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                                      y[w * BATCH:(w + 1) * BATCH])
        loss.backward()
        losses.append(loss.item())
        opt.step()
    summary = arch.finish()
    return [p.detach().numpy().copy() for p in model.parameters()], summary, losses


# name -> (servers, compression, warmup, steps, fixed batch); a world of 3 ranks
SESSIONS = {
    "none": (1, "none", 0, STEPS, False),
    "fp16": (1, "fp16", 0, STEPS, False),
    "bf16": (1, "bf16", 0, STEPS, False),
    "fp16-warmup": (1, "fp16", 3, STEPS, False),
    "topk:0.5": (2, "topk:0.5", 0, FIT_STEPS, True),  # 2 servers, 1 worker: two residuals
    "topk:0.1": (2, "topk:0.1", 0, FIT_STEPS, True),
}


def _sessions(rank, world):
    from gradsync import comm

    return {name: _train(rank, comm.new_group([0, 1, 2]), *args)
            for name, args in SESSIONS.items()}


@pytest.fixture(scope="module")
def runs():
    return run_workers(_sessions, 3, timeout=100)


@pytest.mark.timeout(120)
def test_half_pushes_end_close_to_plain_sync_ps_and_cut_the_bytes(runs):
    dense_step = NUMEL * 8  # float64 parameters, one server, per worker and step
    plain = runs[1]["none"][0]
    for ref, got in zip(reference(2, "sgd"), plain):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)  # none stays exact
    for name, atol in (("fp16", 5e-4), ("bf16", 4e-3)):  # ~10x what they reach
        for rank in (1, 2):
            params, summary, _ = runs[rank][name]
            diff = max(float(np.abs(a - b).max()) for a, b in zip(params, plain))
            assert 0 < diff < atol, (name, diff)
            assert summary["compression"] == name
            assert summary["bytes_pushed_per_step_per_worker"] == NUMEL * 2
            assert summary["bytes_dense_per_step_per_worker"] == dense_step
            assert summary["compression_ratio"] == 4.0
        np.testing.assert_array_equal(runs[1][name][0][0], runs[2][name][0][0])  # one model
        stats = runs[0][name]
        assert stats.bytes_received == 2 * STEPS * NUMEL * 2  # as pushed
    # warmup: 3 dense pushes, then fp16
    summary = runs[1]["fp16-warmup"][1]
    assert summary["compression_ratio"] == pytest.approx(STEPS * 8 / (3 * 8 + (STEPS - 3) * 2))


@pytest.mark.timeout(120)
def test_topk_trains_and_pushes_ratio_times_one_plus_index_bytes(runs):
    from gradsync.ps.compression import topk_count

    shards = (266, 265)  # 531 elements over 2 servers
    for ratio in (0.5, 0.1):
        params, summary, losses = runs[2][f"topk:{ratio}"]
        assert all(np.isfinite(p).all() for p in params)
        assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
        pushed = summary["bytes_pushed_per_step_per_worker"]
        assert pushed == sum(topk_count(n, ratio) * (8 + 8) for n in shards)
        assert pushed / (NUMEL * 8) == pytest.approx(ratio * (1 + 8 / 8), rel=0.02)
        assert summary["compression_ratio"] == pytest.approx(NUMEL * 8 / pushed)


def test_error_feedback_pushed_plus_residual_is_the_sum_of_gradients():
    """Over several steps, per shard: sum of what went out + residual == sum of the gradients,
    each push carries the k largest |grad + residual| entries, and the server's decoding
    gives back exactly what went out."""
    from gradsync.compress.spec import parse
    from gradsync.ps.compression import PushCompressor, PushRules, decode, densify, topk_count
    from gradsync.ps.protocol import CODE_DTYPES, Kind, Status

    numels, ratio = [50, 37, 1, 0], 0.3
    enc = PushCompressor(parse(f"topk:{ratio}"), numels, torch.float64, workers=2)
    gen = torch.Generator().manual_seed(0)
    grads_sum = [torch.zeros(n, dtype=torch.float64) for n in numels]
    pushed_sum = [torch.zeros(n, dtype=torch.float64) for n in numels]
    for _ in range(6):
        for k, n in enumerate(numels):
            grad = torch.randn(n, generator=gen, dtype=torch.float64)
            acc = enc.residuals[k] + grad
            grads_sum[k] += grad
            kind, code, count, wire = enc.encode(k, grad.clone())
            assert kind == Kind.PUSH_SPARSE and count == topk_count(n, ratio)
            status, _, values, indices = decode(kind, count, CODE_DTYPES[code], wire[:-8], n)
            assert status == Status.OK
            rules = PushRules.of(f"topk:{ratio}", torch.float64, n, workers=2)
            dense = densify(values, indices, torch.float64, n, rules)
            left = acc.abs()[dense == 0]
            if count and len(left):  # the largest entries: none left behind beats one sent
                assert acc.abs()[indices].min() >= left.max()
            pushed_sum[k] += dense
    for k in range(len(numels)):
        torch.testing.assert_close(pushed_sum[k] + enc.residuals[k], grads_sum[k],
                                   rtol=1e-12, atol=1e-12)
        assert enc.residuals[k].abs().sum() > 0 or numels[k] <= 1


def test_half_push_divides_first_so_fp16_does_not_overflow():
    from gradsync.compress.spec import parse
    from gradsync.ps.compression import PushCompressor, PushRules, decode, densify

    grad = torch.tensor([1e5, -2e5, 3.0], dtype=torch.float32)  # beyond fp16's 65504
    enc = PushCompressor(parse("fp16"), [3], torch.float32, workers=4)
    kind, code, numel, wire = enc.encode(0, grad.clone())
    _, _, values, indices = decode(kind, numel, torch.float16, wire[:-8], 3)
    assert values.dtype == torch.float16 and torch.isfinite(values).all()
    got = densify(values, indices, torch.float32, 3, PushRules.of("fp16", torch.float32, 3, 4))
    torch.testing.assert_close(got, grad, rtol=1e-3, atol=0)


def test_powersgd_and_pointless_casts_are_refused():
    from gradsync.ps import PSArchitecture, ServerConfig
    from gradsync.ps.compression import PushRules, check_compression

    group = types.SimpleNamespace(size=3, rank=0)
    for make in (lambda: check_compression("powersgd:2"),
                 lambda: ServerConfig(compression="powersgd:2"),
                 lambda: PSArchitecture(1, "sync", 0, group, compression="powersgd:4")):
        with pytest.raises(ValueError, match="parameter server does not support powersgd"):
            make()
    with pytest.raises(ValueError, match="topk needs a ratio"):
        PSArchitecture(1, "sync", 0, group, compression="topk")
    with pytest.raises(ValueError, match="already float16"):
        PushRules.of("fp16", torch.float16, 10, 2)
    assert str(PSArchitecture(1, "sync", 0, group, compression="topk:0.25").compression) \
        == "topk:0.25"


def test_validate_sparse_and_half_pushes():
    from gradsync.ps.protocol import DTYPE_CODES, Header, Kind, Status, validate

    f64 = DTYPE_CODES[torch.float64]
    expect = dict(shard=0, numel=100, step=0, dtype=torch.float64, peer=2)
    sparse = dict(kind=Kind.PUSH_SPARSE, numel=10, sender=2, dtype=f64)
    assert validate(Header(**sparse), **expect, max_k=10) == (Status.OK, "")
    cases = [(sparse, {}, Status.BAD_KIND, "does not compress with top-k"),
             (sparse, {"max_k": 9}, Status.WRONG_SIZE, "10 entries; a top-k push of this "
                                                       "shard has at most 9"),
             ({**sparse, "dtype": DTYPE_CODES[torch.float16]}, {"max_k": 10, "half": torch.float16},
              Status.WRONG_DTYPE, "float16; the shard is float64"),
             ({**sparse, "kind": Kind.PUSH, "numel": 100, "dtype": DTYPE_CODES[torch.bfloat16]},
              {"half": torch.float16}, Status.WRONG_DTYPE, "shard is float64 (or float16)")]
    for fields, extra, status, text in cases:
        got = validate(Header(**fields), **expect, **extra)
        assert got[0] == status and text in got[1], (fields, got)
    half = Header(kind=Kind.PUSH, numel=100, sender=2, dtype=DTYPE_CODES[torch.bfloat16])
    assert validate(half, **expect, half=torch.bfloat16) == (Status.OK, "")


# --- malformed compressed pushes from a raw bad worker ------------------------------------

def _bad_push(case: str, max_k: int) -> list[torch.Tensor]:
    """The header and payload the bad worker sends for ``case`` at step 0."""
    from gradsync.ps.protocol import DTYPE_CODES, END_BYTES, Header, Kind

    k = max_k + 1 if case == "k too large" else max_k
    indices = torch.arange(k, dtype=torch.int64)
    values = torch.full((k,), 0.5, dtype=torch.float64)
    if case == "index out of range":
        indices[3] = NUMEL + 5
    elif case == "negative index":
        indices[0] = -1
    elif case == "repeated index":
        indices[4] = 2
    elif case == "non-finite":
        values[1] = float("nan")
    header = Header(Kind.PUSH_SPARSE, step=0, shard=0, numel=k, sender=BAD,
                    dtype=DTYPE_CODES[torch.float64]).encode()
    trailer = torch.frombuffer(bytearray(END_BYTES), dtype=torch.uint8)
    return [header, torch.cat([indices.view(torch.uint8), values.view(torch.uint8), trailer])]


# case -> (compression of the run, what the server says, status text the bad worker reads)
BAD_CASES = {
    "k too large": ("topk:0.5", "it declares 267 entries; a top-k push of this shard has at "
                    "most 266", "payload size"),
    "index out of range": ("topk:0.5", "index 536 is out of range for a shard of 531 elements",
                           "index is out of range"),
    "negative index": ("topk:0.5", "index -1 is out of range", "index is out of range"),
    "repeated index": ("topk:0.5", "index 2 appears more than once", "or repeated"),
    "sparse without topk": ("fp16", "a PUSH_SPARSE, but this run does not compress with top-k",
                            "kind"),
    "non-finite": ("topk:0.5", "rank 2 pushed a non-finite gradient at step 0: 1 of its 266 "
                   "values", "NaN or Inf"),
}


def _malformed(rank, group, case):
    """Async, server 0; worker 1 trains STEPS steps; worker 2 sends ``case`` at step 0."""
    from gradsync.ps import PSArchitecture, PSProtocolError

    arch = PSArchitecture(1, "async", 0, group, compression=BAD_CASES[case][0])
    model = make_model()
    if rank == 0:
        capture, logger = LogCapture(), logging.getLogger("gradsync.ps.server")
        logger.addHandler(capture)
        try:
            return arch.serve(model, OPTIMIZERS["sgd"]), capture.lines
        finally:
            logger.removeHandler(capture)
    ps_model, opt = arch.prepare(model, OPTIMIZERS["sgd"])
    if rank == BAD:
        from gradsync import comm
        from gradsync.ps.protocol import PAYLOAD_TAG, TAG

        for i, message in enumerate(_bad_push(case, 266)):  # topk_count(531, 0.5)
            comm.send(message, 0, group, TAG if i == 0 else PAYLOAD_TAG)
        ps_model._pushed = [True]  # noqa: SLF001 - pushed by hand; wait for the answer
        with pytest.raises(PSProtocolError) as exc:
            opt.step()
        return str(exc.value)
    for step in range(STEPS):
        x, y = global_batch(step, BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(ps_model(x), y).backward()
        opt.step()
    return arch.finish()["dropped_workers"]


def _malformed_sessions(rank, world):
    from gradsync import comm

    return [_malformed(rank, comm.new_group([0, 1, 2]), case) for case in BAD_CASES]


@pytest.mark.timeout(120)
def test_malformed_sparse_pushes_are_refused_naming_the_rank():
    server, good, bad = run_workers(_malformed_sessions, 3, timeout=110, comm_timeout=60)
    for i, (case, (_, said, status)) in enumerate(BAD_CASES.items()):
        stats, lines = server[i]
        assert stats.rejected == 1 and stats.dropped == [BAD] and stats.updates == STEPS, \
            (case, stats)
        if case != "non-finite":
            said = f"rank 2 sent a malformed PUSH_SPARSE at step 0: {said}"
        assert any(said in line and "dropping rank 2" in line for line in lines), (case, lines)
        assert good[i] == [BAD], (case, good[i])
        assert "rejected rank 2's message" in bad[i] and status in bad[i], (case, bad[i])
