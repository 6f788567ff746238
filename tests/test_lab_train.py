"""`gradsync train --lab 3`: training across emulated hosts ends with the same parameters as
the same configuration run locally, for both architectures, and leaves no namespace behind."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.test_cli import gradsync
from tests.test_lab import needs_netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _final(directory, step):
    return torch.load(directory / f"step-{step:08d}" / "state.pt")["model"]


@needs_netns
@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch,workers", [(["--arch", "allreduce", "--algorithm", "ring"], 3),
                                          (["--arch", "ps", "--servers", "1"], 2)])
def test_lab_training_matches_local_training(tmp_path, arch, workers):
    before = _namespaces()
    allreduce = arch[1] == "allreduce"
    common = ["train", "--dtype", "float64", "--steps", "12", "--no-progress", *arch]

    def run(name, *extra):
        ckpt = ["--checkpoint-dir", str(tmp_path / f"ck-{name}"), "--checkpoint-every", "12"]
        result = gradsync(*common, "--out", str(tmp_path / name), *(ckpt if allreduce else []),
                          *extra, timeout=200)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    lab = run("lab", "--lab", "3", "--rate", "1gbit")
    local = run("local", "--workers", str(workers))
    assert _namespaces() == before
    assert lab["workers"] == local["workers"] == workers
    assert lab["eval_loss"] == local["eval_loss"]
    if allreduce:
        x, y = _final(tmp_path / "ck-lab", 12), _final(tmp_path / "ck-local", 12)
        assert all(torch.equal(x[k], y[k]) for k in x)
