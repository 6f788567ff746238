"""`gradsync train --arch ps --consistency sync --elastic`: a lost worker is dropped and the
servers wait for the live ones; fewer than --min-workers left stops the run naming the rank.
(Without --elastic a lost worker stops a sync run end to end: tests/test_ps_cli.py.)"""

from __future__ import annotations

import re

import pytest
import torch

from gradsync.ps.consistency import Sync
from gradsync.ps.protocol import PSProtocolError, ServerStats
from gradsync.ps.server import ParameterServer, ServerConfig
from tests.distributed import scaled
from tests.helpers import run_and_kill

TIMEOUT = scaled(60)
# 1 server (rank 0), 3 workers (ranks 1-3); partitions of 40 KiB cut digits-mlp's shard into
# 3, so the kill lands with partitions of a step in flight.
ARGS = ["--arch", "ps", "--consistency", "sync", "--elastic", "--servers", "1", "--workers", "3",
        "--ps-partition-mb", "0.04", "--timeout", str(TIMEOUT)]


class _Shard:
    """The part of a ParameterServer that Sync uses: records updates and answers."""

    def __init__(self, workers, partitions):
        self.live, self.partitions, self.step = set(workers), partitions, 0
        self.stats, self.applied, self.answered = ServerStats(), {}, []

    def apply(self, c, grad, step=0, workers=1, worker=None):  # (the last three: trace.py)
        self.applied[c] = grad.tolist()

    def snapshot(self, c):
        return torch.zeros(1)

    def answer(self, worker, c, payload, step):
        self.answered.append((worker, c, step))


def test_sync_drop_completes_the_step_in_flight_without_the_lost_worker():
    # Workers 1, 2, 3; 2 partitions. Worker 3 pushes partition 0 of step 4 and dies: partition
    # 0 was updated with its gradient (all 3 were in), partition 1 averages workers 1 and 2.
    shard = _Shard([1, 2, 3], 2)
    sync = Sync(shard)
    grad = {1: 1.0, 2: 2.0, 3: 6.0}
    for w in (1, 2, 3):
        sync.push(w, 4, 0, 0, torch.tensor([grad[w]]))
    for w in (1, 2):
        sync.push(w, 4, 0, 1, torch.tensor([grad[w]]))
    assert shard.applied == {0: [3.0]} and sync.step_of(3) == 4
    shard.live.discard(3)
    sync.dropped(3)
    assert shard.applied == {0: [3.0], 1: [1.5]}
    assert shard.answered[-2:] == [(1, 1, 4), (2, 1, 4)] and shard.stats.updates == 1
    assert sync.step == 5 and sync.grads == [{}, {}]
    for w in (1, 2):  # the next step waits for the live workers only
        sync.push(w, 5, 1, 0, torch.tensor([float(w)]))
    assert shard.applied[0] == [1.5]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sync_elastic_worker_killed_is_dropped_and_the_others_finish(tmp_path):
    code, stderr, _, summary = run_and_kill([*ARGS, "--steps", "200"], 3, tmp_path)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    drops = re.findall(r"server 0: lost worker rank 3 .*; dropping rank 3 at step (\d+), the "
                       r"others train on \(2 workers\)", stderr)
    assert len(drops) == 1 and 5 <= int(drops[0]) < 200, stderr
    assert summary["dropped_workers"] == [3] and summary["workers_dropped"] == 1, summary
    assert summary["steps"] == 200 and summary["eval_accuracy"] >= 0.90, summary


@pytest.mark.parametrize("consistency, elastic, min_workers, raised", [
    ("sync", False, 1, "a sync step cannot complete without rank 2"),
    ("sync", True, 3, "2 workers left, fewer than --min-workers 3"),
    ("sync", True, 2, None),
    ("async", True, 3, "2 workers left, fewer than --min-workers 3"),
    ("async", False, 3, None)])  # without --elastic, async drops down to the last worker
def test_lost_worker_stops_or_is_dropped(consistency, elastic, min_workers, raised):
    # (the server's main loop with no messages: the event of a lost worker alone)
    server = ParameterServer(torch.zeros(4), 0, [1, 2, 3],
                             lambda params: torch.optim.SGD(params, lr=0.1),
                             ServerConfig(consistency, elastic=elastic, min_workers=min_workers))
    if raised is None:
        server._on_lost(2, "test")
        assert server.live == {1, 3} and server.stats.dropped == [2]
    else:
        with pytest.raises(PSProtocolError, match=f"server 0: lost worker rank 2 .*; {raised}"):
            server._on_lost(2, "test")


def test_a_reply_to_a_worker_already_gone_is_left_to_its_loss_event(monkeypatch):
    # The send of a reply can fail before the receiver thread has reported the worker lost
    # (CI saw it: "lost rank 3 during send" stopped an elastic run). The reply is dropped; the
    # loss event that follows decides.
    from gradsync import comm
    from gradsync.ps import server as server_module
    from gradsync.ps.protocol import Kind

    def gone(*args, **kwargs):
        raise comm.PeerLostError("rank 0: lost rank 2 during send (Connection closed by peer)")

    monkeypatch.setattr(server_module, "send_message", gone)
    server = ParameterServer(torch.zeros(4), 0, [1, 2, 3],
                             lambda params: torch.optim.SGD(params, lr=0.1),
                             ServerConfig("sync", elastic=True, min_workers=1))
    server.reply(2, Kind.PARAMS, torch.zeros(4))
    assert server.stats.bytes_sent == 0
    server._on_lost(2, "test")
    assert server.live == {1, 3}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lost_worker_or_server_restarts_the_run_from_its_checkpoint_bit_for_bit(tmp_path):
    """--max-restarts: killing a worker (rank 3), and in another run a server (rank 0), makes
    the launcher restart every rank from the newest checkpoint (each server reloads its
    shard's file, the steps since are redone); the run ends equal to the bit to one that was
    never disturbed, its metrics hold each step once, and the summary counts the restart."""
    import json
    import subprocess
    import sys

    from tests.helpers import ENV, REPO

    args = ["--arch", "ps", "--servers", "2", "--workers", "4", "--steps", "60",
            "--checkpoint-every", "5", "--timeout", str(TIMEOUT)]
    ref = subprocess.run([sys.executable, "-m", "gradsync", "train", *args, "--no-progress",
                          "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "ref")],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())["parameters_sha1"]
    for victim in (3, 0):
        out = tmp_path / f"killed-{victim}"
        code, stderr, _, summary = run_and_kill(
            [*args, "--elastic", "--max-restarts", "1", "--checkpoint-dir", str(out / "ck")],
            victim, out)
        assert code == 0, stderr
        assert re.search(rf"worker rank {victim} killed by SIGKILL; restarting every rank from "
                         r"the newest checkpoint in .* \(restart 1 of 1\)", stderr), stderr
        assert summary["parameters_sha1"] == expected and summary["restarts"] == 1, summary
        assert 0 < summary["steps_run"] < 60, summary  # resumed, not started over
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
        assert steps == list(range(1, 61)), steps
