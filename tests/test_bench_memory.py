"""`gradsync bench memory` (gradsync/bench/memory.py): what it refuses, every variant's
model state on 2 ranks against ZeRO's formulas, and one small run of the command.

The formulas hold exactly up to padding: with 2 ranks and an MLP whose buckets split
evenly, every rank's model state is the formula's bytes per parameter (float32 Adam). Each
variant's count is checked in one world of 2 processes (a launch costs three interpreters,
each importing torch); the command's own run, its table and JSON, takes two variants."""

from __future__ import annotations

import json

import pytest

from tests.distributed import run_workers
from tests.helpers import gradsync
from tests.helpers import in_process as _in_process
from tests.helpers import one_line_error as _one_line_error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, needle", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--variants", "dp,zero-4"], "unknown zero-4"),
    (["--variants", ""], "unknown empty list"),
    (["--largest"], "--largest needs --limit-mib"),
    (["--limit-mib", "-5"], "--limit-mib must be at least 0"),
    (["--steps", "x"], "--steps"),
])
def test_bench_memory_refuses_bad_flags(capfd, argv, needle):
    _one_line_error(_in_process(capfd, "bench", "memory", *argv), needle)


def test_the_formulas_and_the_mlp_size():
    from gradsync.bench.memory import formula_bytes_per_param, mlp_params
    from gradsync.models import MLP

    assert [formula_bytes_per_param(v, 4) for v in ("dp", "zero-1", "zero-2", "zero-3")] == \
        [16, 10, 7, 4]
    for hidden, layers in ((16, 1), (64, 3)):
        model = MLP(784, [hidden] * layers, 10)
        assert mlp_params(hidden, layers) == sum(p.numel() for p in model.parameters())


# 784*64 + 64 + 64*64 + 64 + 64*10 + 10 parameters: even, so 2 ranks split every bucket
# without padding; the state is the formula's, up to Adam's scalar steps.
HIDDEN, LAYERS, N_PARAMS = 64, 2, 55050


def _model_state(rank, world):
    """Per variant, (parameters, this rank's model state in bytes) after 2 steps of a rank
    of `gradsync bench memory` (its build and its count)."""
    import torch
    import torch.nn.functional as F

    from gradsync.bench.memory_rank import VARIANTS, build, model_state_bytes, n_params

    gen = torch.Generator().manual_seed(1000 + rank)
    x, y = torch.randn(4, 784, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    out = {}
    for variant in VARIANTS:
        model, opt = build(variant, HIDDEN, LAYERS)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        out[variant] = (n_params(model), sum(model_state_bytes(model, opt).values()))
    return out


@pytest.mark.timeout(120)
def test_every_variants_model_state_is_the_formulas():
    from gradsync.bench.memory import formula_bytes_per_param
    from gradsync.bench.memory_rank import VARIANTS

    ranks = run_workers(_model_state, 2, timeout=110)
    for variant in VARIANTS:
        assert {r[variant][0] for r in ranks} == {N_PARAMS}, (variant, ranks)
        state = max(r[variant][1] for r in ranks)  # the command's: the largest rank's
        assert abs(state / N_PARAMS - formula_bytes_per_param(variant, 2)) < 1e-9, \
            (variant, ranks)


@pytest.mark.timeout(300)
def test_bench_memory_small_run_matches_the_formulas(tmp_path):
    out = tmp_path / "memory.json"
    run = gradsync("bench", "memory", "--workers", "2", "--hidden", str(HIDDEN), "--layers",
                   str(LAYERS), "--batch", "4", "--steps", "2", "--variants", "dp,zero-3",
                   "--json", str(out), timeout=240)
    assert run.returncode == 0, run.stderr
    assert "# command: gradsync bench memory" in run.stdout
    rows = json.loads(out.read_text())["peaks"]
    assert [r["variant"] for r in rows] == ["dp", "zero-3"]
    for r in rows:
        assert r["ok"], r
        assert r["n_params"] == N_PARAMS
        assert abs(r["bytes_per_param"] - r["formula"]) < 1e-9, r
        assert r["peak"] > 0
        assert f"{r['variant']:<8}" in run.stdout
