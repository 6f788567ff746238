"""`gradsync train --zero 1|2|3`: what it refuses, that it trains the same parameters as the
run without it, and that its checkpoints resume bit for bit (gradsync/zero/architecture.py).

Equal bits, not only 1e-12: on 2 workers every gradient sum has two addends, which add to
the same bits in either order, and the sharded optimizer does the same arithmetic per
element as the plain one (with more workers the sums' order differs: tests/test_zero.py
compares those to 1e-12)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import gradsync
from tests.helpers import in_process as _in_process
from tests.helpers import one_line_error as _one_line_error

FLOAT64 = ["--workers", "2", "--dtype", "float64", "--no-progress"]


def train(*args: str, timeout: float = 150) -> dict:
    """Run `gradsync train`; the summary when --out is among ``args``, else {}."""
    run = gradsync("train", *FLOAT64, *args, timeout=timeout)
    assert run.returncode == 0, run.stderr
    if "--out" not in args:
        return {}
    out = args[args.index("--out") + 1]
    return json.loads(open(f"{out}/summary.json", encoding="utf-8").read()) | {
        "stdout": run.stdout}


@pytest.mark.timeout(60)
def test_zero_refuses_what_it_is_not_built_for(capfd):
    def refused(args, *needles):
        _one_line_error(_in_process(capfd, "train", "--zero", "2", *args), "--zero 2", *needles)

    for arch in ("ps", "ddp", "auto"):
        refused(["--arch", arch], "--arch allreduce", arch)
    refused(["--arch", "local", "--workers", "1"], "--arch allreduce", "local")
    refused(["--elastic"], "--elastic")
    refused(["--compression", "fp16"], "compression hooks are not built for sharded runs")
    refused(["--engine", "mpi"], "--engine mpi")
    refused(["--on-nonfinite", "skip"], "--on-nonfinite skip")


def test_unknown_stage_is_refused():
    import gradsync

    with pytest.raises(ValueError, match="stage must be one of"):
        gradsync.ShardedDataParallel(torch.nn.Linear(2, 2), stage=4)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return train("--steps", "30", "--out", str(out))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_the_parameters_of_the_plain_run(plain, tmp_path, stage):
    # (Stage 3's parameters are empty at rest: its digest is taken gathered.)
    run = train("--steps", "30", "--zero", str(stage), "--out", str(tmp_path))
    assert run["zero_stage"] == stage and f"ZeRO stage {stage}" in run["stdout"]
    assert plain.get("zero_stage") is None
    assert run["parameters_sha1"] == plain["parameters_sha1"]
    assert run["steps"] == plain["steps"] == 30 and run["parameters"] == plain["parameters"]
    # backward's end waiting on its reduce-scatters counts as communication (stage 3 has no
    # all-gather after the step, so this was 0.0 when only that was counted)
    assert run["comm_wait_s"] > 0


def _state(directory, step: int) -> dict:
    return torch.load(directory / f"step-{step:08d}" / "state.pt")


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_3_resume_is_bitwise_exact_and_its_checkpoint_a_plain_one(tmp_path):
    # Adam (stdlib-gpt): element-wise state and a 0-d ``step`` per parameter.
    gpt = ["--workload", "stdlib-gpt", "--hidden", "32", "--checkpoint-every", "6"]
    # Three runs, not four: the run without --zero is the uninterrupted reference. Stage
    # 3's checkpoint at step 6 must be the plain run's (model, optimizer, position), and
    # stage 3 resumed from it must reach the plain run's step 12 bit for bit.
    zero3 = [*gpt, "--zero", "3"]
    train(*gpt, "--steps", "12", "--checkpoint-dir", str(tmp_path / "plain"))
    train(*zero3, "--steps", "7", "--checkpoint-dir", str(tmp_path / "cut"))
    cut = _state(tmp_path / "cut", 6)
    assert sorted(cut["optimizer"]["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert _equal(cut, _state(tmp_path / "plain", 6))
    train(*zero3, "--steps", "12", "--checkpoint-dir", str(tmp_path / "cut"), "--resume")
    assert _equal(_state(tmp_path / "cut", 12), _state(tmp_path / "plain", 12))
