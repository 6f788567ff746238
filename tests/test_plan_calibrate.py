"""The planner's shared-core constants: kept per machine (plan/machine.py) and fitted from a
lab sweep (plan/calibrate.py). The sweep's runs are replaced here by the model itself with
known constants, so the fit must give those constants back; the real sweep is a benchmark
(docs/benchmarks.md section 16)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from gradsync.plan import calibrate as cal
from gradsync.plan import cluster as cluster_module
from gradsync.plan import machine
from gradsync.plan.cluster import Cluster
from gradsync.plan.machine import DEFAULT, SharedCores
from gradsync.plan.predict import Candidate, cpu_work, predict
from gradsync.plan.profile import Profile
from gradsync.plan.shared import busy_beyond_ends_s

MS = 1e-3
TRUE = SharedCores(endpoint_cpu_s=0.1 * MS, ps_endpoint_cpu_s=0.4 * MS, loop_cpu_s=0.3 * MS,
                   wake_s=2.0 * MS, source="the test's", own_endpoint_cpu_s=0.07 * MS)


def _profile() -> Profile:
    # digits-mlp's shape: 100 KB of gradients ready at the end of a short backward, measured
    # on loaded cores too (as a lab plan's profile is), where DataParallel added nothing.
    return Profile(workload="digits-mlp", batch=32, forward_s=0.2 * MS, backward_s=0.3 * MS,
                   optimizer_s=0.2 * MS, data_s=0.1 * MS, grads=[(0.3 * MS, 100_000)],
                   codecs={}, loaded={"none": [(1.0, 0.0, 0.0, 0.0)]})


def _fake_run(profile: Profile):
    """What the sweep's `gradsync train` runs would measure if the model were exact on a
    machine whose constants are TRUE: the arguments parsed back into a cluster and a
    configuration, the busy CPU the budget counts, the step the model predicts."""
    def run(argv, steps, timeout_s=600.0, env=None):
        flag = dict(zip(argv, argv[1:]))
        if flag["--arch"] == "local":
            assert env == {"OMP_NUM_THREADS": "1"}  # one thread, as the profile
            return {"ranks_user": profile.compute_s + TRUE.loop_cpu_s, "ranks_system": 0.0,
                    "median_step": profile.compute_s}
        hosts = int(flag["--lab"])
        cand = (Candidate("ps", servers=int(flag["--servers"])) if flag["--arch"] == "ps"
                else Candidate("allreduce", flag["--algorithm"]))
        lab = Cluster.parse(hosts, 1, "1gbit", shared=True)
        work = cpu_work(profile, lab, cand)
        endpoint = TRUE.endpoint_s(work.algorithm)
        return {"busy": busy_beyond_ends_s(work, TRUE.loop_cpu_s) + work.message_ends * endpoint,
                "median_step": predict(profile, replace(lab, machine=TRUE), cand).step_s}
    return run


def test_the_sweep_gives_back_the_constants_that_made_its_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADSYNC_CACHE", str(tmp_path))  # no calibrated file: the defaults
    monkeypatch.setattr(cluster_module.os, "cpu_count", lambda: 2)  # the lab's 2 cores
    profile = _profile()
    monkeypatch.setattr(cal, "run_accounted", _fake_run(profile))
    said = []
    got = cal.calibrate(profile=profile, say=said.append)
    assert got.endpoint_cpu_s == pytest.approx(TRUE.endpoint_cpu_s)
    assert got.own_endpoint_cpu_s == pytest.approx(TRUE.own_endpoint_cpu_s)
    assert got.ps_endpoint_cpu_s == pytest.approx(TRUE.ps_endpoint_cpu_s)
    assert got.loop_cpu_s == pytest.approx(TRUE.loop_cpu_s)
    assert got.wake_s == pytest.approx(TRUE.wake_s)  # fitted to the step times
    assert got.source.startswith("calibrated here")
    # Each run's step with the defaults and with the fitted constants, beside the measured.
    row = [line for line in said if line.startswith("allreduce native, 6 hosts")][-1]
    measured, before, after = map(float, row.split()[-3:])
    assert after == pytest.approx(measured, abs=0.01) and before != pytest.approx(measured)


def test_a_machines_figures_are_kept_and_read_only_on_that_machine(monkeypatch, tmp_path,
                                                                   caplog):
    monkeypatch.setenv("GRADSYNC_CACHE", str(tmp_path))
    assert machine.here() == DEFAULT  # nothing calibrated yet
    TRUE.save(machine.cache_path())
    assert machine.here() == TRUE
    assert Cluster.parse(3, shared=True).machine == TRUE  # a lab on this machine reads them
    assert Cluster.parse(3).machine == DEFAULT            # a real cluster's ranks do not share
    monkeypatch.setattr(machine, "fingerprint", lambda: {"cpu": "another", "cores": 64})
    with caplog.at_level(logging.WARNING, logger="gradsync.plan.machine"):
        assert machine.here() == DEFAULT
    assert "another machine" in caplog.text
    for bad in ("{not json", "[1, 2]", '{"machine": {}}'):
        machine.cache_path().write_text(bad)
        assert machine.here() == DEFAULT


def test_calibrate_needs_a_lab():
    from gradsync.plan.cli import PlanConfig

    with pytest.raises(ValueError, match="add --lab"):
        PlanConfig(calibrate=True)


def test_a_lab_plan_says_whose_constants_it_used(monkeypatch, tmp_path, capsys):
    from gradsync.plan.report import print_table

    monkeypatch.setenv("GRADSYNC_CACHE", str(tmp_path))
    print_table(_profile(), Cluster.parse(3, shared=True), [])
    assert "defaults (a 2-core Intel Xeon's lab runs); `gradsync plan --lab --calibrate`" in (
        capsys.readouterr().out)
    replace(TRUE, source="calibrated here, 2026-12-08 04:09").save(machine.cache_path())
    print_table(_profile(), Cluster.parse(3, shared=True), [])
    out = capsys.readouterr().out
    assert "# shared-core constants: calibrated here, 2026-12-08 04:09\n" in out
