"""`gradsync train` end to end, as a user runs it: the default job, bad input, a worker that
dies mid-run, and scripts under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from tests.distributed import free_port, scaled
from tests.helpers import ENV, REPO, gradsync, retry_finalize_abort, run_and_kill
from tests.helpers import in_process as _in_process
from tests.helpers import one_line_error as _one_line_error

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_default_job_reaches_95_percent(tmp_path):
    run = gradsync("train", "--no-progress", "--out", str(tmp_path), timeout=170)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workload"] == "digits-mlp" and summary["workers"] == 2
    assert summary["eval_accuracy"] >= 0.95
    assert "eval accuracy" in run.stdout and "samples/s" in run.stdout
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps"]
    assert json.loads(lines[-1])["step"] == summary["steps"]
    # The split of the time adds up to the measured time, neither part negative.
    assert summary["compute_s"] >= 0 and summary["comm_wait_s"] >= 0
    assert summary["compute_s"] + summary["comm_wait_s"] == pytest.approx(summary["wall_s"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_input_gets_one_clear_line(tmp_path, capfd):
    def refused(args, *needles):
        _one_line_error(_in_process(capfd, "train", *args), *needles)

    refused(["--workload", "mnist-resnet"], "mnist-resnet", "digits-mlp")
    refused(["--workers", "0"], "--workers", "0")
    refused(["--batch-size", "0"], "--batch-size")
    refused(["--batch-size", "-3"], "--batch-size")
    refused(["--algorithm", "butterfly"], "butterfly")
    refused(["--arch", "gossip"], "gossip")
    refused(["--arch", "ps", "--servers", "0"], "--servers")
    refused(["--consistency", "eventual"], "eventual")
    for lr in ("inf", "1e300", "nan", "-1"):
        refused(["--lr", lr], "--lr", "positive")
    refused(["--timeout", "inf"], "--timeout")
    refused(["--compression", "topk:0"], "topk:0", "between 0 and 1")
    refused(["--compression", "topk:1.5"], "topk:1.5")
    refused(["--compression", "powersgd:0"], "powersgd:0", "rank")
    refused(["--compression", "zip"], "zip", "fp16")
    refused(["--compression-warmup", "-1"], "--compression-warmup")
    refused(["--warmup-compression", "int8"], "--warmup-compression", "int8")
    refused(["--compression", "powersgd:2", "--warmup-compression", "bf16"],
            "--warmup-compression", "--compression-warmup")
    refused(["--arch", "ps", "--compression", "topk:0.1", "--compression-warmup", "2",
             "--warmup-compression", "bf16"], "--warmup-compression", "allreduce")
    refused(["--arch", "ps", "--compression", "powersgd:2"], "powersgd", "allreduce")
    refused(["--arch", "ddp", "--compression", "topk:0.1"], "--arch ddp", "topk")
    refused(["--arch", "local", "--workers", "1", "--compression", "fp16"], "--arch local")
    refused(["--topology", str(tmp_path / "nope.json")], "cannot read topology file",
            "nope.json")
    (tmp_path / "bad.json").write_text('{"hosts": [{"ranks": [0], "rate_mbit": -5}]}')
    refused(["--topology", str(tmp_path / "bad.json")], "rate_mbit -5", "positive")
    refused(["--resume", "--overwrite", "--checkpoint-dir", str(tmp_path)], "--overwrite")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(["--out", str(blocker / "sub")], str(blocker / "sub"))
    refused(["--checkpoint-dir", str(blocker)], str(blocker), "is a file")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        refused(["--port", str(port)], str(port))
    # And once through a real process, as a user meets it.
    _one_line_error(gradsync("train", "--workers", "0"), "--workers", "0")
    # A topology for another world is found by the ranks: still one line, exit 2.
    (tmp_path / "three.json").write_text('{"hosts": [{"ranks": [0]}, {"ranks": [1]}, '
                                         '{"ranks": [2]}]}')
    _one_line_error(gradsync("train", "--workers", "2", "--steps", "2", "--topology",
                             str(tmp_path / "three.json")), "--topology", "'h2' lists rank 2")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_at_start_up_and_while_training_exits_quietly(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while torch is still being imported,
    and again once training runs: status 130, no traceback from any process."""
    for moment in ("start-up", "training"):
        out = tmp_path / moment
        proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", "--steps", "100000",
                                 "--no-progress", "--out", str(out)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            if moment == "start-up":
                time.sleep(0.2)  # the launcher is importing torch
            else:
                deadline = time.monotonic() + scaled(60)
                while not ((out / "metrics.jsonl").exists()
                           and (out / "metrics.jsonl").read_text()):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            _, stderr = proc.communicate(timeout=scaled(60))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, (moment, proc.returncode, stderr)
        for noise in ("Traceback", "KeyboardInterrupt", "terminate called"):
            assert noise not in stderr, (moment, stderr)
        assert "gradsync: interrupted" in stderr, (moment, stderr)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ipv6_rendezvous_address(tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    run = gradsync("train", "--addr", "::1", "--workload", "synthetic-mlp", "--hidden", "16",
                   "--steps", "2", "--no-progress")
    assert run.returncode == 0, run.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_worker_fails_the_run_quickly_and_cleanly(tmp_path):
    timeout = scaled(60)
    code, stderr, elapsed, _ = run_and_kill(["--workers", "3", "--epochs", "500", "--timeout",
                                             str(timeout)], 1, tmp_path)
    assert code != 0
    assert "rank 1" in stderr and "SIGKILL" in stderr, stderr
    # The peers notice the dropped connection: far sooner than the timeout.
    assert elapsed < timeout / 2, elapsed


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # torchrun makes a torchelastic_* log directory in TMPDIR and leaves it: give it one of
    # the test's own, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="gradsync-test-torchrun-") as tmp:
        return retry_finalize_abort(lambda: subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args],
            capture_output=True, text=True, timeout=scaled(timeout),
            env={**ENV, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}, cwd=REPO))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_script_runs_with_only_the_wrapper_changed(tmp_path):
    script = str(REPO / "tests" / "scripts" / "ddp_script.py")
    for wrapper in ("gradsync", "ddp"):
        run = _torchrun(script, "--wrapper", wrapper, "--out", str(tmp_path))
        assert run.returncode == 0, run.stderr[-3000:]
    ours = [torch.load(tmp_path / f"gradsync-{r}.pt") for r in range(2)]
    ddp = torch.load(tmp_path / "ddp-0.pt")
    for key in ddp:
        assert torch.equal(ours[0][key], ours[1][key])
        torch.testing.assert_close(ours[0][key], ddp[key], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gradsync_train_under_torchrun(tmp_path):
    run = _torchrun("-m", "gradsync", "train", "--steps", "30", "--no-progress", "--out",
                    str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 30
