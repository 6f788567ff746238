"""Horovod-style scripts, only their import changed, under `gradsync run` with horovodrun's
flags: the synthetic benchmark with a timeline (gradsync/run/timeline.py), and the elastic
script (hvd.elastic) surviving a SIGKILLed worker and taking a replacement in."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import scaled
from tests.helpers import ENV, REPO, retry_finalize_abort

SCRIPT = REPO / "examples" / "horovod_elastic.py"
SYNTHETIC = REPO / "examples" / "horovod_synthetic.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_synthetic_benchmark_with_horovodruns_flags_writes_a_timeline(tmp_path):
    trace = tmp_path / "trace.json"
    run = retry_finalize_abort(lambda: subprocess.run(
        [sys.executable, "-m", "gradsync", "run", "-np", "2", "-H", "localhost:2",
         "--timeline-filename", str(trace), str(SYNTHETIC), "--model", "cnn", "--batch-size",
         "8", "--num-warmup-batches", "1",
         "--num-batches-per-iter", "2", "--num-iters", "2"], capture_output=True, text=True,
        timeout=scaled(100), env=ENV, cwd=REPO))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "replicas agree: True" in run.stdout
    assert re.search(r"total samples/sec on 2 workers: [0-9.]+ \+-[0-9.]+", run.stdout)
    assert f"gradsync: timeline of ranks 0..1: {trace}" in run.stderr
    spans = [(e["pid"], e["name"], e.get("tid")) for e in json.loads(trace.read_text())
             if e["ph"] == "X"]
    steps = 1 + 2 * 2  # warm-up, then iterations of batches
    for rank in (0, 1):
        # every step: the one bucket's all-reduce (the CNN's 0.55 MB of gradients), the
        # wait for it and the optimizer step; then the checksum's two hvd.allreduce calls
        assert spans.count((rank, "optimizer step", 0)) == steps
        assert spans.count((rank, "wait for communication", 0)) == steps
        assert spans.count((rank, "all-reduce", 100)) == steps
        assert spans.count((rank, "allreduce", 0)) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_horovod_elastic_script_survives_a_sigkilled_worker():
    # 3 workers commit every 4 batches and at each epoch's end; member 1 SIGKILLs itself at
    # its 5th commit (epoch 1): the others roll back to their last commit, go on as 2 (the
    # learning rate follows through the reset callback); a replacement (member 3) joins at
    # commit 12 (the members wait there for it), takes the state and the sampler's
    # progress, and epoch 2 runs on 3 workers.
    env = {**ENV, "GRADSYNC_ELASTIC_KILL": "1@5", "GRADSYNC_ELASTIC_AWAIT": "12",
           "GRADSYNC_TIMEOUT": str(scaled(60))}
    run = retry_finalize_abort(lambda: subprocess.run(
        [sys.executable, "-m", "gradsync", "run", "--elastic", "-np", "3", "--min-np", "2",
         "--max-restarts", "1", str(SCRIPT), "--epochs", "3"], capture_output=True,
        text=True, timeout=scaled(200), env=env, cwd=REPO))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "worker 1 killed by SIGKILL; the others go on" in run.stderr
    assert "elastic: generation 1: member 1 left at step 5; 2 workers" in run.stderr
    assert "elastic: generation 2: member 3 joined at step 12; 3 workers" in run.stderr
    epochs = re.findall(r"epoch (\d): loss [0-9.]+ on (\d) workers", run.stdout)
    assert epochs == [("0", "3"), ("1", "2"), ("2", "3")], run.stdout
    accuracy = float(re.findall(r"test accuracy ([0-9.]+) on 3 workers", run.stdout)[-1])
    assert accuracy >= 0.8, run.stdout


def test_torch_state_outside_an_elastic_job_says_how_to_start_one():
    import gradsync.horovod as hvd

    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="needs an elastic job: start the script with "
                                           "`gradsync run --elastic"):
        hvd.elastic.TorchState(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=0)
