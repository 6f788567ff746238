"""Elastic training across hosts on this machine's loopback: `gradsync rdzv` and one agent
per "host" (`gradsync run --elastic --rdzv-endpoint`). A host killed whole (its agent and
workers, so nobody reports the loss) is declared lost through its silence, the others go
on, a new host joins, and nothing is left behind. The lab's link-down trial and the
recovery times: benchmarks/bench_elastic_hosts.py (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest

from gradsync.launcher.launch import find_free_port
from tests.distributed import scaled
from tests.elastic_hosts import Job, _tree
from tests.test_elastic import _digits_oracle_accuracy


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_host_killed_whole_is_dropped_and_a_new_host_joins(tmp_path):
    # Up to 100 epochs, long enough for the joiner (member 3) to come in on a busy machine;
    # the run ends with the epoch in which it joined.
    job = Job(tmp_path, epochs=100, nnodes="3:3", min_workers=2, pause_s=0.02, joiner=3,
              env={"GRADSYNC_TIMEOUT": str(scaled(60))})
    try:
        job.start_service("127.0.0.1", find_free_port("127.0.0.1"))
        for nproc in (1, 1, 1):
            job.start_host(nproc)
        job.wait_step(5, scaled(90))
        victim = job.uids_of(2)[0]
        job.kill_host(2)
        job.wait_step(max(s[-1][0] for s in job.steps().values() if s) + 3, scaled(60))
        joiner = job.start_host(1)  # room again: 2 of 3 hosts train
        service, codes = job.finish(scaled(150))
    except BaseException:
        job.close()
        raise
    assert service == 0 and codes[:2] == [0, 0] and codes[3] == 0, (codes, job.logs())
    gens = job.generations()
    whys = [g["why"] for g in gens]
    assert whys[0] == "formed" and gens[0]["members"] == [0, 1, 2], gens
    assert any(w.endswith(" silent") for w in whys), gens
    assert gens[1]["members"] == [u for u in (0, 1, 2) if u != victim], gens
    final = sorted({0, 1, 2, 3} - {victim})
    assert whys[-1] == "joined" and gens[-1]["members"] == final, gens
    results = job.results()
    assert sorted(results) == final, results
    # one model: the members' parameters agree, the joiner's too
    assert len({r["param_sum"] for r in results.values()}) == 1, results
    assert all(r["members"] == final for r in results.values())
    assert all(_tree(p.pid) == [p.pid] for p in [*job.hosts, joiner]), "processes left"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gradsync_train_across_hosts_replaces_a_lost_worker(tmp_path):
    # `gradsync train --elastic --rdzv-endpoint` on 2 "hosts" of 1 worker: member 1 is
    # SIGKILLed as it starts step 8, its host's agent starts a replacement (--max-restarts 1)
    # that joins at step 16 (the members wait there for it). The run trains on the global
    # batch of the first generation (2 x 32) throughout, so it matches one process.
    job = Job(tmp_path, epochs=0, nnodes="2", min_workers=1,
              env={"GRADSYNC_TIMEOUT": str(scaled(60)), "GRADSYNC_ELASTIC_KILL": "1@8",
                   "GRADSYNC_ELASTIC_AWAIT": "16", "OMP_NUM_THREADS": "1"})
    try:
        job.start_service("127.0.0.1", find_free_port("127.0.0.1"))
        for _ in range(2):
            job.start_train_host(1, ["--steps", "30", "--max-restarts", "1", "--out", "run",
                                     "--timeout", str(scaled(60))])
        service, codes = job.finish(scaled(200))
    except BaseException:
        job.close()
        raise
    assert service == 0 and codes == [0, 0], (codes, job.logs())
    logs = job.logs()
    assert "Traceback" not in logs, logs
    assert "elastic: generation 1: member 1 left at step 8; 1 workers" in logs, logs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["workers"] == 2
    changes = [(c["left"], c["joined"]) for c in summary["elastic"]["changes"]]
    joiner = 1_000_000 * (1 + job.hosts_of()[1])  # a replacement's id names its host
    assert changes == [([1], []), ([], [joiner])], changes
    assert f"elastic: generation 2: member {joiner} joined at step 16; 2 workers" in logs
    assert abs(summary["eval_accuracy"] - _digits_oracle_accuracy(30, 64)) <= 0.005
    assert all(_tree(p.pid) == [p.pid] for p in job.hosts), "processes left"
