"""Elastic training: a worker alive but stuck (SIGSTOP) is declared lost once its heartbeat
has been silent for GRADSYNC_ELASTIC_LOST_S, long before the collective timeout, and the run
goes on (gradsync/comm/heartbeat.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gradsync.comm.heartbeat import KEY, LEAVING, Watch, encode, overdue
from tests.distributed import scaled
from tests.helpers import ENV, REPO, alive, children

LOST_S, BEAT_S = 2.0, 0.5


def test_overdue_judges_silence_after_a_heartbeat_and_before_the_first():
    started = {0: 0.0, 1: 0.0, 2: 0.0, 3: 8.0}
    changed = {0: 9.5, 1: 4.0, 3: 9.0}  # 2 has not beaten yet (still starting up)
    assert overdue(10.0, started, changed, lost_s=5.0, startup_s=30.0) == {1: 6.0}
    assert overdue(31.0, started, changed, lost_s=5.0, startup_s=30.0) == \
        {0: 21.5, 1: 27.0, 2: 31.0, 3: 22.0}
    assert overdue(10.0, {}, changed, lost_s=5.0, startup_s=30.0) == {}  # none judged


def test_watch_names_a_silent_member_once_and_not_one_that_leaves(tmp_path: Path):
    import torch.distributed as dist

    store, now = dist.FileStore(str(tmp_path / "store"), 1), [0.0]
    watch = Watch(store, lost_s=2.0, startup_s=30.0, clock=lambda: now[0])
    for uid in (0, 1, 2):
        watch.start(uid)
    for t, beating in ((0.5, (0, 1, 2)), (1.0, (0, 2)), (2.0, (0, 2)), (2.4, (0, 2))):
        now[0] = t
        for uid in beating:
            store.set(KEY.format(uid), encode(int(t * 1000), 7))
        assert watch.check() == {}, t  # 1 silent since 0.5: not yet 2 s
    store.set(KEY.format(2), encode(LEAVING, 7))  # 2 exits on purpose, beats no more
    now[0] = 3.0
    assert watch.check() == {1: pytest.approx(2.5)}
    now[0] = 10.0
    store.set(KEY.format(0), encode(10_000, 8))
    assert watch.check() == {}  # 1 was named once; 2 is leaving, not silent
    for uid in (0, 1, 2):  # their exits: the keys go
        watch.forget(uid)
    assert not any(store.check([KEY.format(uid)]) for uid in (0, 1, 2))


def _uid_of(pid: int) -> int | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"GRADSYNC_ELASTIC_UID="):
            return int(item.split(b"=", 1)[1])
    return None


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_stopped_worker_is_declared_lost_within_the_heartbeat_bound(tmp_path: Path):
    # 3 workers; member 1 is SIGSTOPped once 5 steps are logged. The survivors wait in their
    # collective (the timeout is 120 s) until the launcher, seeing no heartbeat for LOST_S,
    # SIGKILLs it; then they re-form as 2 and go on. A replacement starts (--max-restarts 1):
    # it imports torch for longer than LOST_S before its first heartbeat, and must not be
    # declared lost for that; the members wait at step 100 until it joins.
    out, marker = tmp_path / "run", uuid.uuid4().hex
    env = {**ENV, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "GRADSYNC_ELASTIC_LOST_S": str(LOST_S), "GRADSYNC_HEARTBEAT_S": str(BEAT_S),
           "GRADSYNC_ELASTIC_AWAIT": "100", "GRADSYNC_TEST_MARK": marker}
    proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", "--elastic",
                             "--workers", "3", "--min-workers", "2", "--steps", "200",
                             "--max-restarts", "1",
                             "--timeout", "120", "--no-progress", "--out", str(out)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + scaled(60)
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "run did not start"
            time.sleep(0.02)
        victim = next(pid for pid in children(proc.pid) if _uid_of(pid) == 1)
        stopped_at = time.time()
        os.kill(victim, signal.SIGSTOP)
        _, stderr = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "gradsync: worker 1 sent no heartbeat for " in stderr, stderr
    assert "s (stopped or hung); declaring it lost" in stderr, stderr
    assert "worker 1 killed by SIGKILL; the others go on" in stderr, stderr
    assert stderr.count("sent no heartbeat") == 1, stderr  # not the replacement
    assert "member 3 joined at step 100; 3 workers" in stderr, stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    # Each step once, in order. The step in flight at the SIGSTOP may have completed on a
    # survivor but not on rank 0 (its ring was cut after the survivor's last chunk); the
    # survivors then take that survivor's state, and rank 0 has no loss of its own to log.
    first_of_two = next(r["step"] for r in records if r["workers"] == 2)
    assert steps == sorted(set(steps)) and steps[-1] == 200, steps
    assert set(range(1, 201)) - set(steps) <= {first_of_two - 1}, steps
    # From the SIGSTOP to the first step the 2 survivors completed: the bound, plus a
    # heartbeat period and the launcher's check, plus the re-forming; nowhere near 120 s.
    recovered = next(r["time"] for r in records if r["workers"] == 2) - stopped_at
    print(f"from the SIGSTOP to the next step of the survivors: {recovered:.2f} s")
    assert LOST_S - BEAT_S - 0.5 < recovered < LOST_S + scaled(3), recovered
    assert not alive(victim)
    found = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if alive(pid)
             and _has(pid, f"GRADSYNC_TEST_MARK={marker}")]
    assert found == [], "processes left behind"


def _has(pid: int, item: str) -> bool:
    try:
        return item.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
