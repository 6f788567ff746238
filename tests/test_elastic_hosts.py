"""Elastic training across hosts on this machine's loopback: `gradsync rdzv` and one agent
per "host" (`gradsync run --elastic --rdzv-endpoint`). A host killed whole (its agent and
workers, so nobody reports the loss) is declared lost through its silence, the others go
on, a new host joins, and nothing is left behind. The lab's link-down trial and the
recovery times: benchmarks/bench_elastic_hosts.py (docs/reliability.md)."""

from __future__ import annotations

import pytest

from gradsync.launcher.launch import find_free_port
from tests.distributed import scaled
from tests.elastic_hosts import Job, _tree


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_host_killed_whole_is_dropped_and_a_new_host_joins(tmp_path):
    job = Job(tmp_path, epochs=100, nnodes="3:3", min_workers=2, pause_s=0.02,
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
