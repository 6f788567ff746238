"""Every script in examples/ runs, briefly, the way its docstring says to launch it, and
reaches what it promises (an accuracy, an exact resume, a served answer)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import scaled
from tests.helpers import ENV, REPO, gradsync, namespaces, needs_netns

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


def _running(script: str) -> list[int]:
    """Pids of processes whose command line names ``script`` (none should outlive a run)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                if script.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile
                pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_elastic_digits_loses_a_worker_and_finishes():
    """gradsync.elastic's State under `gradsync run --elastic`: worker 1 SIGKILLs itself at
    step 20 (GRADSYNC_ELASTIC_KILL, the fault injection of gradsync/train/elastic.py); the
    others go on, finish the 8 epochs and reach the accuracy of the undisturbed run."""
    script = str(EXAMPLES / "elastic_digits.py")
    run = subprocess.run([sys.executable, "-m", "gradsync", "run", "--elastic",
                          "--nproc-per-node", "3", "--min-workers", "2", script,
                          "--epochs", "8"], capture_output=True, text=True,
                         env={**ENV, "GRADSYNC_ELASTIC_KILL": "1@20"}, cwd=REPO,
                         timeout=scaled(150))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "worker 1 killed by SIGKILL; the others go on" in run.stderr
    assert "membership changes: 1" in run.stdout
    assert _accuracy(run.stdout) >= 0.93
    assert not _running(script), "processes left behind"


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

