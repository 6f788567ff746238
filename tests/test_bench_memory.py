"""`gradsync bench memory` (gradsync/bench/memory.py): what it refuses, and one small run of
every variant on 2 ranks whose model state matches ZeRO's formulas.

The formulas hold exactly up to padding: with 2 ranks and an MLP whose buckets split
evenly, every rank's model state is the formula's bytes per parameter (float32 Adam)."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.timeout(300)
def test_bench_memory_small_run_matches_the_formulas(tmp_path):
    out = tmp_path / "memory.json"
    run = gradsync("bench", "memory", "--workers", "2", "--hidden", "64", "--layers", "2",
                   "--batch", "4", "--steps", "2", "--json", str(out), timeout=240)
    assert run.returncode == 0, run.stderr
    assert "# command: gradsync bench memory" in run.stdout
    rows = json.loads(out.read_text())["peaks"]
    assert [r["variant"] for r in rows] == ["dp", "zero-1", "zero-2", "zero-3"]
    for r in rows:
        assert r["ok"], r
        # 784*64 + 64 + 64*64 + 64 + 64*10 + 10 parameters: even, so 2 ranks split every
        # bucket without padding; the state is the formula's, up to Adam's scalar steps.
        assert r["n_params"] == 55050
        assert abs(r["bytes_per_param"] - r["formula"]) < 1e-9, r
        assert r["peak"] > 0
        assert f"{r['variant']:<8}" in run.stdout
