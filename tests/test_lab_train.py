"""`gradsync train --lab 3`: training across emulated hosts ends with the same parameters as
the same configuration run locally, for both architectures, and leaves no namespace behind."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from tests.distributed import scaled
from tests.helpers import ENV, REPO, gradsync, in_process, namespaces, needs_netns

pytestmark = pytest.mark.slow



def _final(directory, step):
    return torch.load(directory / f"step-{step:08d}" / "state.pt")["model"]


@needs_netns
@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch,workers", [(["--arch", "allreduce", "--algorithm", "ring"], 3),
                                          (["--arch", "ps", "--servers", "1"], 2)])
def test_lab_training_matches_local_training(tmp_path, arch, workers):
    before = namespaces()
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
    assert namespaces() == before
    assert lab["workers"] == local["workers"] == workers
    assert lab["eval_loss"] == local["eval_loss"]
    if allreduce:
        x, y = _final(tmp_path / "ck-lab", 12), _final(tmp_path / "ck-local", 12)
        assert all(torch.equal(x[k], y[k]) for k in x)


@needs_netns
@pytest.mark.timeout(240)
def test_cut_link_fails_the_run_naming_the_host(tmp_path):
    """A host whose link goes down sends no FIN or RST: only the timeout and the
    heartbeats can tell. The run must still stop, naming that rank."""
    import subprocess as sp
    import sys
    import time

    from gradsync import lab as lab_mod

    before_labs = {lab.name for lab in lab_mod.status()}
    # The comm timeout is what notices the cut, so it stays short; the bound on how long the
    # run took to stop scales with it.
    timeout = scaled(8)
    proc = sp.Popen([sys.executable, "-m", "gradsync", "train", "--lab", "3", "--rate", "1gbit",
                     "--steps", "100000", "--timeout", str(timeout), "--algorithm", "native",
                     "--no-progress", "--out", str(tmp_path)], cwd=REPO, env=ENV,
                    stdout=sp.PIPE, stderr=sp.STDOUT, text=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + scaled(120)
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "run did not start"
            time.sleep(0.1)
        (lab,) = [lab for lab in lab_mod.status() if lab.name not in before_labs]
        cut_at = time.monotonic()
        sp.run(["ip", "-n", lab.switch_ns, "link", "set", lab.hosts[2].port, "down"], check=True)
        output, _ = proc.communicate(timeout=scaled(90))
        elapsed = time.monotonic() - cut_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # Not the "[rank 2]" prefix of its own lines: the others' diagnosis must name it.
    # The stall report lists every rank missing from the collective: rank 1 too when it was
    # still one collective behind, waiting for rank 2 in the ring.
    assert "rank 2 stopped responding" in output, output[-3000:]
    assert re.search(r"not arrived: [^\n]*\brank 2 \(", output), output[-3000:]
    assert elapsed < scaled(45), elapsed  # the 8 s timeout, the diagnosis, the grace period
    assert not [other for other in lab_mod.status() if other.name not in before_labs]


@needs_netns
@pytest.mark.timeout(60)
def test_lab_commands_through_the_cli(capfd):
    """up, run, status, down as a user types them, through the top-level CLI's main() (the
    `python -m gradsync` entry itself is every other CLI test's); no interpreter start-up."""
    name = "cli-test"
    before = namespaces()
    try:
        up = in_process(capfd, "lab", "up", "--hosts", "2", "--rate", "1gbit", "--name", name)
        assert up.returncode == 0, up.stderr
        run = in_process(capfd, "lab", "run", "--name", name, "--", sys.executable, "-c",
                         "import os; print('rank', os.environ['RANK'], os.environ['WORLD_SIZE'])")
        assert run.returncode == 0, run.stderr
        assert "[rank 0] rank 0 2" in run.stdout and "[rank 1] rank 1 2" in run.stdout
        assert name in in_process(capfd, "lab", "status").stdout
    finally:
        in_process(capfd, "lab", "down", "--name", name)
    assert namespaces() == before
