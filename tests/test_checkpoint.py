"""Checkpoints: round trip, pruning, damaged and foreign files, several ranks, crashes.

The SIGKILL trials during writes are in tests/test_checkpoint_kills.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import gradsync.checkpoint.format as ckpt_format
from gradsync.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMeta,
    IncompatibleCheckpointError,
    capture_rng_state,
    model_fingerprint,
    restore_rng_state,
)
from tests.helpers import filled_with


def small_model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 2)).double()


def meta(step: int, model: torch.nn.Module, world_size: int = 1,
         **kw: object) -> CheckpointMeta:
    fields = dict(step=step, epoch=0, workload="test", world_size=world_size,
                  arch="allreduce", param_fingerprint=model_fingerprint(model))
    fields.update(kw)
    return CheckpointMeta(**fields)  # type: ignore[arg-type]


def save_filled(mgr: CheckpointManager, step: int, model: torch.nn.Module) -> None:
    """Save `model` with every parameter set to `step`, so contents identify the step."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    mgr.save(step, {"model": model.state_dict()}, meta(step, model),
             per_rank={"rank": torch.tensor(0)})


def continuation(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple:
    """Three more training steps on random batches, plus a draw from every generator."""
    for _ in range(3):
        x = torch.rand(5, 4, dtype=torch.float64) + float(np.random.rand()) + random.random()
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    draws = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1),
             np.random.randn())
    return [p.detach().clone() for p in model.parameters()], draws


@pytest.mark.timeout(30)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_round_trip_resumes_bitwise(tmp_path: Path, optimizer: str) -> None:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = small_model()
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
               else torch.optim.Adam(model.parameters(), lr=0.01))
        return model, opt

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state, so it is round-tripped
    model, opt = build()
    continuation(model, opt)  # optimizer state (momentum, Adam moments) is non-trivial now
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "sampler": {"epoch": 0, "seed": 1, "position": 15}},
             meta(3, model), per_rank=capture_rng_state())
    expected_params, expected_draws = continuation(model, opt)

    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # scramble the generators
    model, opt = build()
    state, per_rank, loaded_meta = CheckpointManager(tmp_path).load(3, expect=meta(0, model))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    restore_rng_state(per_rank)
    params, draws = continuation(model, opt)

    assert loaded_meta == meta(3, model)
    assert state["sampler"] == {"epoch": 0, "seed": 1, "position": 15}
    assert all(torch.equal(a, b) for a, b in zip(params, expected_params))
    assert torch.equal(draws[0], expected_draws[0])
    assert np.array_equal(draws[1], expected_draws[1])
    assert draws[2:] == expected_draws[2:]


@pytest.mark.timeout(30)
def test_keep_prunes_oldest_and_leftovers(tmp_path: Path) -> None:
    model = small_model()
    mgr = CheckpointManager(tmp_path, keep=2)
    (tmp_path / "step-00000005.tmp").mkdir()  # a crashed save
    (tmp_path / "step-00000006").mkdir()  # a crash between rename and marker
    for step in (10, 20, 30, 40):
        save_filled(mgr, step, model)
    assert mgr.committed_steps() == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]
    assert filled_with(mgr.load(30)[0], 30)


def damage(path: Path, kind: str) -> Path:
    """Damage checkpoint directory `path` in one way; return the file the error must name."""
    state = path / "state.pt"
    marker = path / "COMMITTED"
    if kind == "flipped byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
        return state
    if kind == "truncated":
        state.write_bytes(state.read_bytes()[:-100])
        return state
    if kind == "random bytes, valid checksum":  # passes the checksum, fails to unpickle
        junk = np.random.default_rng(0).bytes(state.stat().st_size)
        state.write_bytes(junk)
        record = json.loads(marker.read_text())
        record["files"]["state.pt"]["sha256"] = ckpt_format.sha256_of(state)
        marker.write_text(json.dumps(record))
        return state
    if kind == "bad JSON marker":
        marker.write_text(marker.read_text()[:-20])
        return marker
    if kind == "missing rank file":
        (path / "rank-0.pt").unlink()
        return path / "rank-0.pt"
    raise AssertionError(kind)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["flipped byte", "truncated", "random bytes, valid checksum",
                                  "bad JSON marker", "missing rank file"])
def test_damaged_newest_fails_clearly_and_older_still_load(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    model = small_model()
    mgr = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        save_filled(mgr, step, model)
    bad = damage(tmp_path / "step-00000003", kind)

    with pytest.raises(CheckpointError, match=str(bad)) as info:
        mgr.load(3)  # rank 0 reads state.pt and rank-0.pt
    assert "\n" not in str(info.value)
    if kind in ("truncated", "bad JSON marker", "missing rank file"):
        assert mgr.latest() == 2  # the cheap scan already rejects these
    with caplog.at_level(logging.WARNING, logger="gradsync.checkpoint"):
        step, state, _, found = mgr.load_latest_valid(expect=meta(0, model))
    assert (step, found.step) == (2, 2) and filled_with(state, 2)
    assert str(bad) in caplog.text


@pytest.mark.timeout(30)
def test_stray_entries_named_like_checkpoints(tmp_path: Path) -> None:
    model = small_model()
    mgr = CheckpointManager(tmp_path)
    save_filled(mgr, 1, model)
    stray = tmp_path / "step-00000009"
    stray.write_bytes(os.urandom(1000))
    assert mgr.latest() == 1
    with pytest.raises(CheckpointError, match=f"{stray}: not a checkpoint directory"):
        mgr.load(9)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mgr.load(7)
    assert mgr.load_latest_valid()[0] == 1
    save_filled(mgr, 2, model)
    assert stray.exists()  # not ours to delete


@pytest.mark.timeout(30)
def test_foreign_and_resharded_checkpoints(tmp_path: Path) -> None:
    model, other = small_model(8), small_model(16)
    mgr = CheckpointManager(tmp_path)
    save_filled(mgr, 1, model)
    path = tmp_path / "step-00000001"
    with pytest.raises(IncompatibleCheckpointError) as info:
        mgr.load(1, expect=meta(0, other))
    message = str(info.value)
    assert str(path) in message
    assert model_fingerprint(model) in message and model_fingerprint(other) in message
    with pytest.raises(IncompatibleCheckpointError, match="workload 'test'.*'other'"):
        mgr.load_latest_valid(expect=meta(0, model, workload="other"))  # no silent fallback
    with pytest.raises(IncompatibleCheckpointError, match="written by 1 ranks, this run has 4"):
        mgr.load(1, expect=meta(0, model, world_size=4))
    state, per_rank, _ = mgr.load(1, expect=meta(0, model, world_size=4), allow_reshard=True)
    assert filled_with(state, 1) and per_rank is None


@pytest.mark.timeout(30)
def test_several_ranks_commit_only_when_all_files_exist(tmp_path: Path) -> None:
    world = 4
    model = small_model()
    mgrs = [CheckpointManager(tmp_path, rank=r) for r in range(world)]
    state = {"model": model.state_dict()}

    def write(rank: int, step: int) -> None:
        mgrs[rank].save_rank_files(step, state if rank == 0 else None,
                                   per_rank={"rank": torch.tensor(rank), "step": step})

    # Ranks 0..2 write, rank 3 has not: committing now must fail and commit nothing.
    for rank in range(world - 1):
        write(rank, 5)
    with pytest.raises(CheckpointError, match="rank-3.pt: missing"):
        mgrs[0].commit(5, meta(5, model, world))
    assert mgrs[0].latest() is None
    with pytest.raises(ValueError, match="not the committer"):
        mgrs[1].commit(5, meta(5, model, world))

    with ThreadPoolExecutor(world) as pool:  # concurrent writers share the staging directory
        list(pool.map(write, range(world), [6] * world))
    mgrs[0].commit(6, meta(6, model, world))  # after the caller's barrier
    for rank in range(world):
        _, per_rank, found = mgrs[rank].load(6, expect=meta(0, model, world))
        assert per_rank == {"rank": torch.tensor(rank), "step": 6}
        assert found.world_size == world
    assert mgrs[0].load_latest_valid()[0] == 6
    # The failed save of step 5 left a staging directory; the commit of 6 removed it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006"]


@pytest.mark.timeout(30)
def test_resave_after_fallback_drops_the_abandoned_future(tmp_path: Path) -> None:
    model = small_model()
    mgr = CheckpointManager(tmp_path, keep=3)
    for step in (10, 20, 30):
        save_filled(mgr, step, model)
    damage(tmp_path / "step-00000030", "flipped byte")
    assert mgr.load_latest_valid()[0] == 20  # the run resumes from 20 ...
    save_filled(mgr, 25, model)  # ... and its next checkpoint supersedes 30
    assert mgr.committed_steps() == [10, 20, 25]
    save_filled(mgr, 25, model)  # saving the same step again replaces it
    assert mgr.committed_steps() == [10, 20, 25] and filled_with(mgr.load(25)[0], 25)


@pytest.mark.timeout(30)
def test_unloadable_state_is_refused_at_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    model = small_model()
    with pytest.raises(TypeError, match=r"state\['extra'\]\[0\] is a numpy.ndarray"):
        mgr.save(1, {"extra": [np.zeros(2)]}, meta(1, model))
    with pytest.raises(ValueError, match="meta.step is 2"):
        mgr.save(1, {}, meta(2, model))
    assert mgr.latest() is None


class _Crash(Exception):
    pass


@pytest.mark.timeout(30)
def test_crash_at_every_durability_point(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Abort a save before each fsync, rename and removal in turn; the data stays usable."""
    model = small_model()
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2):
        save_filled(mgr, step, model)
    originals = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}
    originals["rmtree"] = ckpt_format.shutil.rmtree
    crash_at, step = 1, 3
    while True:
        calls = [0]

        def hook(name: str):
            def call(*args: object, **kwargs: object) -> object:
                calls[0] += 1
                if calls[0] == crash_at:
                    raise _Crash(name)
                return originals[name](*args, **kwargs)
            return call

        for name in ("fsync", "rename", "replace"):
            monkeypatch.setattr(os, name, hook(name))
        monkeypatch.setattr(ckpt_format.shutil, "rmtree", hook("rmtree"))
        try:
            save_filled(CheckpointManager(tmp_path, keep=2), step, model)
            crashed = False
        except _Crash:
            crashed = True
        monkeypatch.undo()
        fresh = CheckpointManager(tmp_path, keep=2)
        latest = fresh.latest()
        assert latest in (step - 1, step), (crash_at, latest)
        assert filled_with(fresh.load(latest)[0], latest)
        if not crashed:
            break
        crash_at += 1
        step = latest + 1
    assert crash_at >= 8  # the protocol really has that many points to interrupt
    save_filled(CheckpointManager(tmp_path, keep=2), step + 1, model)
    assert len(list(tmp_path.iterdir())) == 2  # all leftovers of the crashes are gone


SETTINGS = {"workload": "test", "hidden": 8, "dtype": "float64", "seed": 3}


@pytest.mark.timeout(30)
def test_meta_records_the_workload_settings_and_old_markers_still_load(tmp_path: Path) -> None:
    model = small_model()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": model.state_dict()}, meta(1, model, settings=SETTINGS))
    assert mgr.load(1)[2].settings == SETTINGS
    # A marker written before settings were recorded has no key: it loads, settings None.
    marker = tmp_path / "step-00000001" / "COMMITTED"
    record = json.loads(marker.read_text())
    del record["meta"]["settings"]
    marker.write_text(json.dumps(record))
    assert mgr.load(1)[2] == meta(1, model)
    assert mgr.load(1)[2].settings is None
    record["meta"]["settings"] = {"hidden": [8]}
    marker.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="malformed.*settings"):
        mgr.load(1)
    with pytest.raises(ValueError, match="settings"):
        meta(1, model, settings={"dtype": torch.float64})


class _OneRank:
    """The least a Checkpointer asks of an architecture (checkpoint/protocol.py)."""

    committer, checkpoint_tag, replicated = 0, "allreduce", True

    def __init__(self, group):
        self.group = group

    def commit_checkpoint(self, step, commit, written=True):
        commit()


def _checkpointer_saves(rank: int, world: int, directory: str) -> dict | None:
    from gradsync import comm
    from gradsync.checkpoint import Checkpointer, Position

    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Checkpointer(directory, model, every=1, keep=1, arch=_OneRank(comm.world()),
                      workload="test", settings={**SETTINGS, "dtype": torch.float64})
    ck.load(resume=False)
    ck.maybe_save(Position(step=1), model, opt)
    return CheckpointManager(directory).load(1)[2].settings


@pytest.mark.timeout(60)
def test_checkpointer_writes_the_settings_it_is_given(tmp_path: Path) -> None:
    from tests.distributed import run_workers

    # A torch dtype is written by its name, as the --dtype flag spells it.
    assert run_workers(_checkpointer_saves, 1, str(tmp_path), timeout=50) == [SETTINGS]
