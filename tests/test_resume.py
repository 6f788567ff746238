"""Checkpoints in `gradsync train`: exact resume (All-Reduce and sync Parameter Server),
agreement on the checkpoint, a new worker count, a foreign checkpoint, and runs killed while
they write checkpoints. (An async PS that drops a worker stops committing: test_ps_cli.py's
run that kills one.)"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed import scaled
from tests.helpers import ENV, REPO, gradsync

pytestmark = pytest.mark.slow

PS = ["--arch", "ps", "--servers", "2", "--workers", "2"]
ARCHS = {"allreduce": [], "ps-sync": PS}


def final_model(directory, step):
    return torch.load(directory / f"step-{step:08d}" / "state.pt")["model"]


def train(*args, timeout=120):
    run = gradsync("train", "--dtype", "float64", "--no-progress", "--checkpoint-every", "10",
                   *args, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Per architecture, the checkpoints (steps 20, 30, 40) of a run of 40 steps, made once
    for the tests below; a test that writes to one works on its own copy."""
    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"straight-{arch}")
            train(*ARCHS[arch], "--steps", "40", "--checkpoint-dir", str(made[arch]))
        return made[arch]
    return get


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(ARCHS))
def test_resume_is_bitwise_exact(tmp_path, straight, name):
    # 23 steps per epoch at 2 workers x 32: step 20 is mid-epoch, 40 is in the next one.
    # The run cut after step 20: the straight run's checkpoints without those after 20 (a
    # run of 25 steps would have written the same step 20 and no later checkpoint).
    arch = ARCHS[name]
    cut = shutil.copytree(straight(name), tmp_path / "cut")
    for step in (30, 40):
        shutil.rmtree(cut / f"step-{step:08d}")
    run = train(*arch, "--steps", "40", "--checkpoint-dir", str(cut), "--resume",
                "--out", str(tmp_path / "out"))
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 20, run.stderr
    a, b = final_model(straight(name), 40), final_model(tmp_path / "cut", 40)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if arch:  # each server's shard and its momentum too
        for server in (0, 1):
            a, b = (torch.load(d / "step-00000040" / f"rank-{server}.pt")["state"]
                    for d in (straight(name), tmp_path / "cut"))
            assert torch.equal(a["shard"], b["shard"]) and a["version"] == b["version"] == 40
            assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"],
                               b["optimizer"]["state"][0]["momentum_buffer"])


@pytest.mark.timeout(180)
def test_corrupt_newest_falls_back_and_new_worker_count_resumes(tmp_path, straight):
    ck = copy_of(straight("allreduce"), tmp_path)
    state = ck / "step-00000040" / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    run = train("--steps", "45", "--workers", "3", "--checkpoint-dir", str(ck), "--resume",
                "--checkpoint-every", "5")
    assert "checksum" in run.stderr  # the warning names the damaged file
    # Back to step 30, then 15 steps at 3 workers, saving step 40 again on the way.
    assert torch.load(ck / "step-00000045" / "state.pt")["position"][0] == 45
    assert torch.load(ck / "step-00000040" / "state.pt")["position"][0] == 40


@pytest.mark.timeout(180)
def test_foreign_checkpoint_is_a_clear_error(tmp_path, straight):
    ck = copy_of(straight("allreduce"), tmp_path)
    run = gradsync("train", "--workload", "digits-cnn", "--steps", "20", "--no-progress",
                   "--checkpoint-dir", str(ck), "--resume")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "digits-mlp" in run.stderr and "digits-cnn" in run.stderr, run.stderr


@pytest.mark.timeout(180)
def test_ps_checkpoint_resumes_only_the_same_servers_and_layout(tmp_path, straight):
    ck = copy_of(straight("ps-sync"), tmp_path)
    # Another number of servers, or the same servers laid out otherwise (--ps-layout).
    for args, ours in [((*PS[:-3], "3", "--workers", "2"), "ps (3 servers, striped layout)"),
                       ((*PS, "--ps-layout", "contiguous"), "'ps (2 servers)'")]:
        run = gradsync("train", *args, "--steps", "50", "--no-progress",
                       "--checkpoint-dir", str(ck), "--resume")
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert "ps (2 servers, striped layout)" in run.stderr and ours in run.stderr, run.stderr
        # One rank chose the checkpoint and says why; the others stop without a second story.
        assert run.stderr.count("gradsync: error:") == 1, run.stderr
        assert "PeerLostError" not in run.stderr, run.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(ARCHS))
def test_runs_killed_while_checkpointing_resume(tmp_path, name):
    # Two trials: the second one resumes from what the first kill left. (The checkpoint
    # manager alone meets 30 kills in test_checkpoint_kills.py.)
    arch = ARCHS[name]
    rng = random.Random(5)
    ck = tmp_path / "ck"
    for trial in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", *arch, "--dtype",
                                 "float64", "--steps", "100000", "--no-progress",
                                 "--checkpoint-dir", str(ck), "--checkpoint-every", "1",
                                 "--keep", "2", "--resume"], cwd=REPO, env=ENV,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + scaled(60)
        while not list(ck.glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))  # a random moment of a run that saves every step
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker at once
        proc.wait()
    before = max(int(p.name[5:13]) for p in ck.glob("step-*")
                 if (p / "COMMITTED").exists())
    run = train(*arch, "--steps", str(before + 3), "--checkpoint-dir", str(ck), "--resume",
                "--checkpoint-every", "1", "--out", str(tmp_path / "out"))
    assert (ck / f"step-{before + 3:08d}" / "COMMITTED").exists(), run.stderr
    # It resumed from the newest committed checkpoint: exactly 3 more steps ran.
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 3
