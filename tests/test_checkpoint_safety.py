"""Nothing the user saved is lost: a fresh run refuses a directory with checkpoints, pruning
touches only the same run, one job per directory, a full disk leaves the newest checkpoint
intact, `--resume` with nothing to resume says so, and ranks that cannot read the newest
checkpoint make every rank fall back together."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from gradsync.checkpoint import CheckpointError, CheckpointManager, CheckpointMeta
from gradsync.checkpoint import DirectoryLock, DirectoryLockedError
from tests.distributed import run_workers
from tests.helpers import gradsync

QUICK = ["--no-progress", "--checkpoint-every", "2", "--steps", "4"]


def committed(directory) -> list[int]:
    return CheckpointManager(directory).committed_steps()


def one_error_line(run: subprocess.CompletedProcess, code: int = 2) -> str:
    assert run.returncode == code and "Traceback" not in run.stderr, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradsync: error:"), run.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    ck = tmp_path / "ck"
    # --resume with nothing to resume says so at the default log level, and starts afresh.
    run = gradsync("train", *QUICK, "--checkpoint-dir", str(ck), "--resume")
    assert run.returncode == 0 and "nothing to resume" in run.stderr, run.stderr
    assert "did not exist" in run.stderr
    # Another workload into the same directory: refused, nothing removed.
    line = one_error_line(gradsync("train", "--workload", "synthetic-mlp", "--hidden", "16",
                                   *QUICK, "--checkpoint-dir", str(ck)))
    assert str(ck) in line and "--resume" in line and "--overwrite" in line, line
    assert committed(ck) == [2, 4]
    # (--overwrite on such a directory, naming what it removes: test_checkpoint_hardening.py)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    with DirectoryLock(tmp_path):
        with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}"):
            DirectoryLock(tmp_path)
        line = one_error_line(gradsync("train", *QUICK, "--checkpoint-dir", str(tmp_path)))
        assert "in use by another run" in line and f"pid {os.getpid()}" in line, line
    DirectoryLock(tmp_path).release()  # released on exit of the holder: free again


def _meta(step: int, workload: str) -> CheckpointMeta:
    return CheckpointMeta(step, 0, workload, 1, "allreduce", "f" * 40)


def test_pruning_touches_only_the_same_run(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (5, 10):  # another run's checkpoints, newer than what follows
        mgr.save(step, {"w": torch.zeros(1)}, _meta(step, "digits-mlp"))
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.ones(1)}, _meta(step, "synthetic-mlp"))
    assert mgr.committed_steps() == [2, 3, 5, 10]  # 2 of its own; the others untouched


def test_full_disk_keeps_the_newest_and_removes_the_partial_save(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.zeros(4)}, _meta(1, "digits-mlp"))

    def full(path, obj):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gradsync.checkpoint.manager.write_fsynced", full)
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        mgr.save(2, {"w": torch.ones(4)}, _meta(2, "digits-mlp"))
    assert str(tmp_path) in str(info.value) and "(step 1) is intact" in str(info.value)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001"]
    assert torch.equal(mgr.load(1)[0]["w"], torch.zeros(4))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_end_to_end(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = gradsync("train", "--workload", "synthetic-mlp", "--hidden", "32", "--steps", "40",
                       "--checkpoint-every", "2", "--no-progress",
                       "--checkpoint-dir", str(disk / "ck"))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        lines = run.stderr.splitlines()
        assert lines and all("no space left on device" in ln and str(disk / "ck") in ln
                             for ln in lines), run.stderr
        assert not list((disk / "ck").glob("*.tmp"))
        steps = committed(disk / "ck")
        assert steps and CheckpointManager(disk / "ck").load_latest_valid()[0] == steps[-1]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fall_back_when_one_rank_cannot_read(rank, world_size, directory):
    from gradsync import comm
    from gradsync.allreduce.architecture import AllReduceArchitecture
    from gradsync.checkpoint import Checkpointer, Position

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    arch = AllReduceArchitecture(comm.world())
    saver = Checkpointer(directory, model, every=1, arch=arch, workload="digits-mlp")
    assert saver.load(resume=False) is None
    for step in (1, 2):
        saver.maybe_save(Position(step, 0, step), model, opt)
    saver._lock.release() if saver._lock else None
    comm.barrier()
    loader = Checkpointer(directory, model, every=1, arch=arch, workload="digits-mlp")
    if rank == 1:  # its view of the newest checkpoint is damaged (e.g. another disk)
        real = loader.manager.load

        def load(step, **kw):
            if step == 2:
                raise CheckpointError(f"rank-{rank}.pt: checksum mismatch (injected)")
            return real(step, **kw)

        loader.manager.load = load
    return loader.load(resume=True).position.step


@pytest.mark.timeout(120)
def test_ranks_fall_back_together_when_one_cannot_read(tmp_path):
    assert run_workers(_fall_back_when_one_rank_cannot_read, 2, str(tmp_path)) == [1, 1]
