"""Every script in examples/ runs, briefly, the way its docstring says to launch it, and
reaches what it promises (an accuracy, an exact resume, a served answer)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import scaled
from tests.helpers import (ENV, REPO, gradsync, namespaces, needs_netns, retry_finalize_abort,
                           serve_started, stop_serve)

EXAMPLES = REPO / "examples"


def _accuracy(stdout: str) -> float:
    found = re.findall(r"test accuracy ([0-9.]+)", stdout)
    assert found, stdout[-2000:]
    return float(found[-1])


def _python(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=scaled(timeout))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_users_path_train_export_serve(tmp_path):
    """The README's path: the DDP-tutorial script (wrapper swapped) unchanged under
    `gradsync run`, its weights exported with torch.export, served by `gradsync serve`, and
    queried with tritonclient: the served answers are the model's, to 1e-5."""
    weights, program = tmp_path / "digits_cnn.pt", tmp_path / "digits_cnn.pt2"
    run = retry_finalize_abort(lambda: gradsync(
        "run", "--nproc-per-node", "2", str(EXAMPLES / "digits_ddp.py"), "--epochs", "8",
        "--save", str(weights), timeout=150))
    assert run.returncode == 0, run.stderr[-3000:]
    trained = _accuracy(run.stdout)
    assert trained >= 0.93
    exported = _python(str(EXAMPLES / "export_and_serve.py"), "export", str(weights),
                       str(program))
    assert exported.returncode == 0, exported.stderr[-3000:]
    serve = subprocess.Popen([sys.executable, "-m", "gradsync", "serve", "--port", "0",
                              "--replicas", "1", "--model", f"digits={program}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV, cwd=REPO)
    try:
        url = re.search(r"http://\S+", serve_started(serve, lambda: serve.communicate()[1]))
        asked = _python(str(EXAMPLES / "export_and_serve.py"), "query", url.group(0),
                        "digits", "--weights", str(weights))
    finally:
        stop_serve(serve)
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert f"served accuracy {trained:.4f}" in asked.stdout
    difference = float(re.search(r"run here ([0-9.e+-]+)", asked.stdout).group(1))
    assert difference <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_digits_on_the_parameter_server():
    """The same CNN through gradsync.ps from a script: 1 server, 2 workers, sync."""
    run = retry_finalize_abort(lambda: gradsync(
        "run", "--nproc-per-node", "3", str(EXAMPLES / "digits_ps.py"), "--epochs", "8",
        timeout=150))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _accuracy(run.stdout) >= 0.93
    assert "on 2 workers and 1 servers (sync)" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_char_lm_resumes_exactly(tmp_path):
    """The compressed (bf16) transformer LM with checkpoints: 30 steps straight, and a
    resume to 30 from its checkpoint at step 20 (a copy of it alone: what a run of 20 steps
    leaves, less step 10's), end with the same parameters bit for bit."""
    def lm(ckpt, steps, *extra):
        run = gradsync("run", "--nproc-per-node", "2", str(EXAMPLES / "char_lm.py"),
                       "--steps", str(steps), "--every", "10", "--ckpt", str(tmp_path / ckpt),
                       *extra, timeout=120)
        return run

    straight = lm("a", 30)
    assert straight.returncode == 0, straight.stderr[-3000:]
    steps = sorted(p.name for p in (tmp_path / "a").glob("step-*"))
    assert len(steps) == 3 and steps[-1].endswith("30"), steps  # steps 10, 20, 30
    shutil.copytree(tmp_path / "a", tmp_path / "b",
                    ignore=shutil.ignore_patterns(steps[0], steps[-1]))
    resumed = lm("b", 30, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # It went on from step 20: a run from step 0 would have written step 10's checkpoint.
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == steps[1:]
    digest = re.compile(r"parameters ([0-9a-f]{16})")
    assert digest.search(resumed.stdout).group(1) == digest.search(straight.stdout).group(1)


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
    run = retry_finalize_abort(lambda: subprocess.run(
        [sys.executable, "-m", "gradsync", "run", "--elastic", "--nproc-per-node", "3",
         "--min-workers", "2", script, "--epochs", "8"], capture_output=True, text=True,
        env={**ENV, "GRADSYNC_ELASTIC_KILL": "1@20"}, cwd=REPO, timeout=scaled(150)))
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
    run = retry_finalize_abort(lambda: gradsync(
        "run", "--lab", "3", "--rate", "1gbit", str(EXAMPLES / "digits_ddp.py"), "--epochs",
        "8", timeout=200))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _accuracy(run.stdout) >= 0.93
    assert "on 3 workers" in run.stdout
    assert namespaces() == before  # the lab is gone with the run



@pytest.mark.slow
@pytest.mark.timeout(180)
def test_horovod_digits_runs_with_one_import_changed():
    """A Horovod-style script (`import gradsync.horovod as hvd`: init, broadcast_parameters,
    broadcast_optimizer_state, DistributedOptimizer, allreduce of the test counts) under
    `gradsync run`, with fp16 gradients: it reaches the DataParallel example's accuracy."""
    run = retry_finalize_abort(lambda: gradsync(
        "run", "--nproc-per-node", "2", str(EXAMPLES / "horovod_digits.py"), "--epochs", "8",
        "--fp16-allreduce", timeout=150))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _accuracy(run.stdout) >= 0.93
    assert "on 2 workers" in run.stdout
