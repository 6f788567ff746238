"""Every script in examples/ runs, briefly, the way its docstring says to launch it, and
reaches what it promises (an accuracy, an exact resume, a served answer)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO, gradsync, namespaces, needs_netns

EXAMPLES = REPO / "examples"


def _accuracy(stdout: str) -> float:
    found = re.findall(r"test accuracy ([0-9.]+)", stdout)
    assert found, stdout[-2000:]
    return float(found[-1])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_digits_ddp_under_gradsync_run():
    """The DDP-tutorial script, wrapper swapped, unchanged under `gradsync run`."""
    run = gradsync("run", "--nproc-per-node", "2", str(EXAMPLES / "digits_ddp.py"),
                   "--epochs", "8", timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _accuracy(run.stdout) >= 0.93


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_digits_ddp_across_a_three_host_lab():
    before = namespaces()
    run = gradsync("run", "--lab", "3", "--rate", "1gbit", str(EXAMPLES / "digits_ddp.py"),
                   "--epochs", "8", timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _accuracy(run.stdout) >= 0.93
    assert "on 3 workers" in run.stdout
    assert namespaces() == before  # the lab is gone with the run

