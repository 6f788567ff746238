"""Elastic training: a lost worker leaves, the survivors go on, a replacement joins.

The exactness oracle is SGD on the same global batches in one process: with the global batch
kept, the data-parallel run equals it whatever the membership, so a run that loses a worker
at step k equals one that had the survivors' count from step k on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from gradsync.data.sampler import ElasticOrder, ShardedSampler
from tests import _elastic_worker as ew
from tests.distributed import scaled

REPO = Path(__file__).resolve().parent.parent


def test_elastic_order_covers_every_epoch_once_across_membership_changes():
    order = ElasticOrder(107, seed=3)
    seen: dict[int, list[int]] = {}
    epoch, offset, members = 0, 0, 4
    for step in range(14):  # 4 workers, then 3 from step 2, then 5 from step 9
        members = {2: 3, 9: 5}.get(step, members)
        shares = [order.batch(epoch, offset, 20, members, i) for i in range(members)]
        taken = shares[0][1]
        chunk = [i for share, _, w in shares if w > 0 for i in share]
        assert sorted(chunk) == sorted(order.epoch_indices(epoch)[offset:offset + taken])
        # The weights make the average of the members' weighted mean losses the step's mean.
        assert sum(w for _, _, w in shares) == pytest.approx(members)
        seen.setdefault(epoch, []).extend(chunk)
        offset += taken
        epoch, offset = epoch + (offset >= 107), offset % 107
    assert sorted(seen[0]) == list(range(107)) and sorted(seen[1]) == list(range(107))
    # A fixed membership that divides the batch gets what ShardedSampler gives, step by step.
    for rank in range(4):
        sampler = ShardedSampler(107, 4, rank, seed=3)
        sampler.set_epoch(1)
        mine = [order.batch(1, 20 * s, 20, 4, rank)[0] for s in range(5)]
        assert sum(mine, []) == list(sampler)[:25]
    # A last chunk smaller than the membership: the worker without a share gets weight 0.
    assert order.batch(0, 105, 20, 3, 2)[1:] == (2, 0.0)


def oracle(steps: int, rescale: str = "batch", workers_from: dict[int, int] | None = None
           ) -> list[torch.Tensor]:
    """One process, SGD on the global batches of ElasticOrder: BATCH * WORKERS each
    (rescale "batch"), or BATCH per member at the learning rate scaled by the member count
    (rescale "lr"; ``workers_from`` maps a step to the count from that step on)."""
    model, x, y = ew.build()
    opt = ew.make_optimizer(model.parameters())
    order, epoch, offset, workers = ElasticOrder(ew.N, seed=0), 0, 0, ew.WORKERS
    for step in range(steps):
        workers = (workers_from or {}).get(step, workers)
        batch = ew.BATCH * (ew.WORKERS if rescale == "batch" else workers)
        if rescale == "lr":
            opt.param_groups[0]["lr"] = ew.LR * workers / ew.WORKERS
        chunk = order.epoch_indices(epoch)[offset:offset + batch]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[chunk]), y[chunk]).backward()
        opt.step()
        offset += len(chunk)
        epoch, offset = epoch + (offset >= ew.N), offset % ew.N
    return [p.detach() for p in model.parameters()]


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
            os.getenv("PYTHONPATH")])), "OMP_NUM_THREADS": "1",
            "TORCH_CPP_LOG_LEVEL": "ERROR", **extra}


def _survivors(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (this test's own), still alive."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rescale", ["batch", "lr"])
def test_lost_worker_run_equals_sgd_on_the_same_global_batches(tmp_path: Path, rescale: str):
    # Python API, float64: 4 workers, member 2 SIGKILLed as it starts step 3; the survivors
    # redo step 3 and go on across an epoch's end. "batch": 3 shares of 7, 7, 6 of each
    # global batch of 20 (6 steps per epoch, the last one of 7 samples); "lr": batches of
    # 15 from step 3 on, at 3/4 of the learning rate.
    from gradsync.comm.coordinator import Coordinator
    from gradsync.launcher.elastic import run_elastic

    steps, marker = 9, f"GRADSYNC_TEST_MARK={uuid.uuid4().hex}"
    coordinator = Coordinator.on_this_host(ew.WORKERS, 2, scaled(60))
    mark_key, mark_value = marker.split("=")

    def env_of(uid: int) -> dict[str, str]:
        return _env({**coordinator.env(), "MASTER_ADDR": "127.0.0.1",
                     "GRADSYNC_ELASTIC_UID": str(uid), "GRADSYNC_ELASTIC_KILL": "2@3",
                     "GLOO_SOCKET_IFNAME": "lo", "TEST_COMM_TIMEOUT": str(scaled(60)),
                     mark_key: mark_value})

    try:
        result = run_elastic([sys.executable, "-m", "tests._elastic_worker", str(tmp_path),
                              str(steps), rescale], env_of, range(ew.WORKERS),
                             coordinator)
        keys = sorted(k if isinstance(k, str) else k.decode()
                      for k in coordinator.store.list_keys())
    finally:
        coordinator.close()
    assert result.returncode == 0, result
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["workers"] == 3 and out["step"] == steps
    assert [(c["generation"], c["left"], c["joined"], c["step"]) for c in out["changes"]] \
        == [(1, [2], [], 3)]
    for got, want in zip(out["params"], oracle(steps, rescale, {3: 3})):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want,
                                   rtol=1e-12, atol=1e-13)
    # The store keeps no key of an older generation: it does not grow with them.
    assert not [k for k in keys if k.startswith(("g0/", "elastic/arrived/0/"))], keys
    # state, done; per member: arrival, gloo address; FileStore's own reference count
    # (listed as "efcount/").
    assert len(keys) <= 2 + 2 * 3 + 2, keys
    assert _survivors(marker) == []


def _train(tmp_path: Path, args: list[str], env: dict[str, str]):
    return subprocess.run([sys.executable, "-m", "gradsync", "train", "--elastic",
                           "--no-progress", "--timeout", str(scaled(60)), *args],
                          env=_env(env), capture_output=True, text=True,
                          timeout=scaled(150), cwd=tmp_path)


def _digits_oracle_accuracy(steps: int, global_batch: int = 128) -> float:
    """digits-mlp trained in one process on the global batches (4 x 32) of the run."""
    from gradsync.train.trainer import make_optimizer
    from gradsync.workloads import build_workload, summarize_eval

    w = build_workload("digits-mlp", seed=0)
    opt = make_optimizer(w.optimizer, w.model.parameters(), w.default_lr)
    x, y = w.train_set.tensors
    order, epoch, offset = ElasticOrder(len(x), seed=0), 0, 0
    for _ in range(steps):
        chunk = order.epoch_indices(epoch)[offset:offset + global_batch]
        opt.zero_grad()
        w.loss_fn(w.model(x[chunk]), y[chunk]).backward()
        opt.step()
        offset += len(chunk)
        epoch, offset = epoch + (offset >= len(x)), offset % len(x)
    ex, ey = w.eval_set.tensors
    with torch.no_grad():
        return summarize_eval(w, w.eval_sums(w.model(ex), ey))["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rank_0_lost_and_replaced_run_finishes_with_4_workers(tmp_path: Path):
    # gradsync train: rank 0 (which would have served the store without --elastic) is
    # SIGKILLed at step 10; the other 3 go on, a replacement starts (--max-restarts 1) and
    # joins at step 20 (the members wait there for it, so that a short run sees the join).
    marker = uuid.uuid4().hex
    proc = _train(tmp_path, ["--workers", "4", "--min-workers", "2", "--max-restarts", "1",
                             "--steps", "60", "--out", "run", "--checkpoint-dir", "ck",
                             "--checkpoint-every", "15", "--keep", "4"],
                  {"GRADSYNC_ELASTIC_KILL": "0@10", "GRADSYNC_ELASTIC_AWAIT": "20",
                   "GRADSYNC_TEST_MARK": marker})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "worker 0 killed by SIGKILL; the others go on" in proc.stderr, proc.stderr
    assert "elastic: generation 1: member 0 left at step 10; 3 workers" in proc.stderr
    assert "elastic: generation 2: member 4 joined at step 20; 4 workers" in proc.stderr
    assert "membership         2 changes" in proc.stdout, proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["steps"] == 60
    assert [(c["left"], c["joined"]) for c in summary["elastic"]["changes"]] == \
        [([0], []), ([], [4])]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(1, 61))
    assert abs(summary["eval_accuracy"] - _digits_oracle_accuracy(60)) <= 0.005
    # The checkpoints were written by the members of the moment: 3 at step 15, then 4.
    from gradsync.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "ck")
    assert [(step, meta.world_size) for step, meta in manager.committed()] == [
        (15, 3), (30, 4), (45, 4), (60, 4)]
    assert _survivors(f"GRADSYNC_TEST_MARK={marker}") == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_below_min_workers_stops_and_resumes_from_its_newest_checkpoint(tmp_path: Path):
    # 2 workers, both needed: member 1 is SIGKILLed as it starts step 5, the run stops;
    # checkpoints 2 and 4 were written by the members. --resume continues from step 4 and
    # ends with the parameters of a run that was never stopped, bit for bit.
    common = ["--workers", "2", "--min-workers", "2", "--steps", "8"]
    ck = ["--checkpoint-dir", "ck", "--checkpoint-every", "2"]
    proc = _train(tmp_path, [*common, *ck], {"GRADSYNC_ELASTIC_KILL": "1@5"})
    assert proc.returncode == 128 + 9, (proc.returncode, proc.stderr)
    assert "gradsync: worker rank 1 killed by SIGKILL; 1 worker(s) left, fewer than " \
        "--min-workers 2: stopping the other workers" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == \
        ["step-00000002", "step-00000004"]
    # A fresh run refuses the directory; --resume takes it.
    refused = _train(tmp_path, [*common, *ck], {})
    assert refused.returncode == 2 and "pass --resume" in refused.stderr, refused.stderr
    resumed = _train(tmp_path, [*common, *ck, "--resume", "--out", "resumed"], {})
    assert resumed.returncode == 0, resumed.stderr
    straight = _train(tmp_path, [*common, "--out", "straight"], {})
    assert straight.returncode == 0, straight.stderr
    got, want = (json.loads((tmp_path / run / "summary.json").read_text())
                 for run in ("resumed", "straight"))
    assert got["steps"] == want["steps"] == 8
    assert got["parameters_sha1"] == want["parameters_sha1"]
    metrics = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [5, 6, 7, 8]
