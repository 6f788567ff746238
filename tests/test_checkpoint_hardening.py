"""Issue 22, the checkpoint items: nothing is written through a symlink, a directory another
user could write into is refused, a read-only directory is one line, and ``--overwrite``
says what it removes (and needs ``--checkpoint-every``).

The tests that take a directory away from this user (``chown``, a read-only bind mount) need
root and skip without it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from gradsync.checkpoint import CheckpointError, CheckpointManager, CheckpointMeta
from gradsync.checkpoint import DirectoryLock
from gradsync.train.config import CheckpointConfig
from tests.helpers import gradsync, in_process, one_line_error

QUICK = ["--no-progress", "--workload", "synthetic-mlp", "--hidden", "16",
         "--checkpoint-every", "2", "--steps", "4"]
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another "
                                                          "user or mounting needs root")


def _meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(step, 0, "digits-mlp", 1, "allreduce", "f" * 40)


def _victim(path: Path) -> Path:
    path.write_bytes(b"precious")
    return path


# --- item 7: symlinks are never followed -----------------------------------------------------

@pytest.mark.timeout(30)
def test_the_lock_never_opens_a_symlink_or_a_hard_link(tmp_path):
    victim = _victim(tmp_path / "victim")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "LOCK").symlink_to(victim)
    with pytest.raises(CheckpointError, match=f"{ck / 'LOCK'} is a symbolic link"):
        DirectoryLock(ck)
    (ck / "LOCK").unlink()
    os.link(victim, ck / "LOCK")  # another name of the same file: truncating it is as bad
    with pytest.raises(CheckpointError, match="not a plain file with one name"):
        DirectoryLock(ck)
    assert victim.read_bytes() == b"precious"
    (ck / "LOCK").unlink()
    DirectoryLock(ck).release()  # a plain LOCK (made here) still locks


@pytest.mark.timeout(30)
def test_staged_symlinks_are_replaced_not_written_through(tmp_path):
    victim, elsewhere = _victim(tmp_path / "victim"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    ck = tmp_path / "ck"
    mgr = CheckpointManager(ck)
    mgr.create()
    # A staged file that points elsewhere (the path a multi-rank save takes: no discard).
    staged = ck / "step-00000001.tmp"
    staged.mkdir()
    (staged / "state.pt").symlink_to(victim)
    (staged / "rank-0.pt").symlink_to(victim)
    mgr.save_rank_files(1, {"w": torch.ones(2)}, per_rank={"r": torch.zeros(1)})
    mgr.commit(1, _meta(1))
    # A staging directory that is a symlink to another directory.
    (ck / "step-00000002.tmp").symlink_to(elsewhere, target_is_directory=True)
    mgr.save_rank_files(2, {"w": torch.full((2,), 2.0)})
    mgr.commit(2, _meta(2))
    assert victim.read_bytes() == b"precious" and list(elsewhere.iterdir()) == []
    for step in (1, 2):
        path = ck / f"step-{step:08d}"
        assert not path.is_symlink() and not (path / "state.pt").is_symlink()
        assert torch.equal(mgr.load(step)[0]["w"], torch.full((2,), float(step)))
    # A committed file replaced by a symlink no longer counts: nothing reads through it.
    (ck / "step-00000002" / "state.pt").unlink()
    (ck / "step-00000002" / "state.pt").symlink_to(ck / "step-00000001" / "state.pt")
    assert mgr.committed_steps() == [1]


@pytest.mark.timeout(30)
@needs_root
def test_a_directory_others_can_write_into_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    os.chown(ck, NOBODY, NOBODY)
    with pytest.raises(CheckpointError, match=f"{ck} is owned by .*uid {NOBODY}.*not by this"):
        CheckpointManager(ck).save(1, {"w": torch.ones(1)}, _meta(1))
    os.chown(ck, os.geteuid(), os.getegid())
    for mode, who in ((0o775, "its group"), (0o1777, "its group and others")):
        os.chmod(ck, mode)
        with pytest.raises(CheckpointError, match=f"writable by {who} .*chmod go-w"):
            CheckpointManager(ck).save(1, {"w": torch.ones(1)}, _meta(1))
    assert list(ck.iterdir()) == []  # refused before anything was written
    os.chmod(ck, 0o755)
    CheckpointManager(ck).save(1, {"w": torch.ones(1)}, _meta(1))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_run_stages_afresh_and_refuses_another_users_directory(tmp_path):
    victim, elsewhere = _victim(tmp_path / "victim"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    ck = tmp_path / "ck"
    ck.mkdir()
    # Left by an earlier run, or planted: a staging directory and a staged file, symlinked.
    (ck / "step-00000002.tmp").symlink_to(elsewhere, target_is_directory=True)
    (ck / "step-00000004.tmp").mkdir()
    (ck / "step-00000004.tmp" / "state.pt").symlink_to(victim)
    run = gradsync("train", *QUICK, "--checkpoint-dir", str(ck))
    assert run.returncode == 0, run.stderr
    assert victim.read_bytes() == b"precious" and list(elsewhere.iterdir()) == []
    assert CheckpointManager(ck).committed_steps() == [2, 4]
    if os.geteuid() != 0:
        return
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    one_line_error(gradsync("train", *QUICK, "--checkpoint-dir", str(theirs)),
                   str(theirs), f"uid {NOBODY}", "of your own")
    assert list(theirs.iterdir()) == []


# --- item 8: a read-only directory, and --overwrite -----------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_root
def test_a_read_only_directory_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    # Root ignores mode bits; a read-only bind mount refuses root too (EROFS).
    if subprocess.run(["mount", "--bind", str(ck), str(ck)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ck)],
                          capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        run = gradsync("train", *QUICK, "--checkpoint-dir", str(ck))
        one_line_error(run, f"cannot write a checkpoint into {ck}", "Read-only file system")
    finally:
        subprocess.run(["umount", str(ck)], check=True)


@pytest.mark.timeout(30)
def test_overwrite_needs_checkpoint_every(tmp_path, capfd):
    with pytest.raises(ValueError, match="--checkpoint-every"):
        CheckpointConfig(dir=str(tmp_path), overwrite=True)
    CheckpointConfig(dir=str(tmp_path), overwrite=True, every=2)
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, {"w": torch.ones(1)}, _meta(2))
    one_line_error(in_process(capfd, "train", "--no-progress", "--checkpoint-dir",
                              str(tmp_path), "--overwrite"), "--overwrite", "--checkpoint-every")
    assert mgr.committed_steps() == [2]  # nothing removed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_overwrite_names_what_it_removes_before_removing_it(tmp_path):
    ck = tmp_path / "ck"
    mgr = CheckpointManager(ck)
    for step in (2, 4):
        mgr.save(step, {"w": torch.ones(1)}, _meta(step))
    run = gradsync("train", *QUICK[:-1], "2", "--checkpoint-dir", str(ck), "--overwrite")
    assert run.returncode == 0, run.stderr
    warned = [ln for ln in run.stderr.splitlines() if "--overwrite: removing" in ln]
    assert len(warned) == 1 and str(ck) in warned[0], run.stderr
    assert "workload digits-mlp (allreduce, another workload) steps 2, 4" in warned[0], warned
    assert mgr.committed_steps() == [2]
