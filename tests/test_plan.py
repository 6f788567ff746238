"""`gradsync plan`: the model's arithmetic on profiles written by hand, and the command.
(Its accuracy against real runs is a benchmark: docs/benchmarks.md, section 16.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradsync.plan.cluster import PAYLOAD, Cluster
from gradsync.plan.predict import Candidate, candidates, overlap, predict, rank
from gradsync.plan.profile import Profile
from tests.helpers import ENV, REPO
from tests.distributed import scaled

MB = 1 << 20


def _profile(**kw) -> Profile:
    # 8 MB of gradients in 4 parameters of 2 MB, ready 1, 2, 3 and 4 ms into a 4 ms backward.
    base = dict(workload="w", batch=10, forward_s=0.002, backward_s=0.004, optimizer_s=0.001,
                data_s=0.0, grads=[(0.001 * (i + 1), 2 * MB) for i in range(4)],
                codecs={"fp16": (0.0, 0.5)})
    return Profile(**{**base, **kw})


def test_overlap_runs_each_transfer_after_it_is_ready_and_the_one_before():
    assert overlap([]) == 0.0
    assert overlap([(1.0, 0.5), (1.2, 0.5), (3.0, 0.1)]) == pytest.approx(3.1)


def test_chunks_keep_parameters_whole_and_carry_the_last_ready_time():
    p = _profile()
    assert p.chunks(5 * MB) == [(0.002, 4 * MB), (0.004, 4 * MB)]
    assert p.chunks(1) == p.grads  # a parameter larger than the cap is a chunk alone
    assert p.chunks(100 * MB) == [(0.004, 8 * MB)]


def test_a_slow_network_leaves_the_ring_on_the_link_and_names_it():
    # 2 hosts x 1 rank, 8 Mbit/s (1 MB/s): a 25 MB bucket (all 8 MB) at the end of backward,
    # ring wire bytes 2 (p-1)/p x 8 MB = 8 MB -> 8 s; nothing overlaps.
    cluster = Cluster((1e6, 1e6), latency_s=0.0)
    pred = predict(_profile(), cluster, Candidate("allreduce", "native"))
    assert pred.exposed_s == pytest.approx(8 * MB / 1e6, rel=1e-3)
    assert pred.step_s == pytest.approx(0.002 + 0.004 + 8 * MB / 1e6 + 0.001, rel=1e-3)
    assert pred.bottleneck == "links (all equally busy)" and pred.workers == 2
    half = predict(_profile(), cluster, Candidate("allreduce", "native", compression="fp16"))
    assert half.exposed_s == pytest.approx(pred.exposed_s / 2, rel=1e-3)


def test_a_fast_network_hides_behind_backward():
    # Buckets of one 2 MB parameter each, ready every 100 ms: each is done (about 2 ms of the
    # ranks' own copying) long before the next; only the last one's shows after backward.
    slow_backward = _profile(backward_s=0.4, grads=[(0.1 * (i + 1), 2 * MB) for i in range(4)])
    cluster = Cluster((1e12, 1e12), latency_s=0.0)
    pred = predict(slow_backward, cluster, Candidate("allreduce", "native", bucket_mb=2))
    assert pred.bottleneck == "compute" and 0 < pred.exposed_s < 0.005


def test_ps_bytes_land_on_the_servers_host_and_fewer_workers_train():
    # 3 hosts x 1 rank, PS k=1: server host 0 receives 2 x 8 MB and sends 2 x 8 MB; at
    # 16 MB/s that is 1 s a step, the link of host 0.
    cluster = Cluster((16e6,) * 3, latency_s=0.0)
    pred = predict(_profile(), cluster, Candidate("ps", servers=1))
    assert pred.workers == 2 and pred.bottleneck == "link of host 0"
    assert 16 * MB / 16e6 <= pred.step_s < 16 * MB / 16e6 + 0.05
    two = predict(_profile(), Cluster((16e6,) * 4, latency_s=0.0), Candidate("ps", servers=2))
    assert two.step_s < pred.step_s  # two server links share the load of 2 workers


def test_candidates_follow_the_clusters_shape_and_rank_by_throughput():
    p = _profile()
    names = {c.label for c in candidates(Cluster((1e9, 1e9, 2e8), 2), p)}
    assert {"allreduce aware", "allreduce hierarchical", "ps k=3", "allreduce native fp16"} <= names
    assert "allreduce shm" not in names and "ps k=4" not in names
    assert "allreduce shm" in {c.label for c in candidates(Cluster((1e9,), 2), p, False)}
    preds = rank(p, Cluster((1e6,) * 3), candidates(Cluster((1e6,) * 3), p))
    rates = [q.samples_per_s(p.batch) for q in preds]
    assert rates == sorted(rates, reverse=True)


def test_cluster_flags_are_payload_rates_and_bad_ones_are_named():
    c = Cluster.parse(2, 1, "100mbit", latency_us=5)
    assert c.rates == (100e6 / 8 * PAYLOAD,) * 2 and c.cores is None
    assert c.latency_s == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="lists 1 rates for 2 hosts"):
        Cluster.parse(2, 1, rates="1gbit")
    with pytest.raises(ValueError, match="cannot parse rate"):
        Cluster.parse(1, 1, "fast")


@pytest.mark.timeout(120)
def test_plan_measures_a_workload_and_emits_the_best_flags(tmp_path):
    """The command end to end: a measured profile saved, read back, ranked as JSON, and the
    first row's flags emitted; a bad flag is one line, exit 2."""
    profile = tmp_path / "p.json"

    def plan(*args):
        return subprocess.run([sys.executable, "-m", "gradsync", "plan", *args],
                              capture_output=True, text=True, env=ENV, cwd=REPO,
                              timeout=scaled(100))

    run = plan("--hosts", "3", "--rate", "100mbit", "--procs-per-host", "1", "--lab",
               "--save-profile", str(profile), "--emit", "json")
    assert run.returncode == 0, run.stderr
    ranked = json.loads(run.stdout)
    saved = Profile.load(profile)
    assert saved.workload == "digits-mlp" and len(ranked) > 10
    # --lab: every compressor (and DataParallel without one) also timed on loaded worlds.
    assert set(saved.loaded) == {"none", *saved.codecs}
    assert [point[0] for point in saved.loaded["none"]] == [max(2, c) / c for c in
                                                            (os.cpu_count(),)] + [2.0]
    flags = plan("--profile", str(profile), "--hosts", "3", "--rate", "100mbit",
                 "--procs-per-host", "1", "--lab", "--emit", "flags")
    assert flags.returncode == 0, flags.stderr
    assert flags.stdout.split() == ["--workload", "digits-mlp", "--batch-size", "32",
                                    "--hidden", "1024", *ranked[0]["flags"], "--lab", "3",
                                    "--rates", "100mbit,100mbit,100mbit"]
    table = plan("--profile", str(profile), "--hosts", "2", "--rate", "1gbit", "--scaling",
                 "--top", "3", "--no-compression")
    assert table.returncode == 0 and "bottleneck" in table.stdout and "1024" in table.stdout
    bad = plan("--hosts", "2", "--rates", "1gbit")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--rates lists 1 rates for 2 hosts" in bad.stderr


def test_auto_chooses_plans_first_row_on_unequal_links_and_honours_restrictions():
    """`--arch auto`'s chooser on a described cluster (3 hosts, one 100 Mbit link): with no
    restriction, `gradsync plan`'s first row; restrictions keep only what they name."""
    from gradsync.plan import choose

    p, cluster = _profile(), Cluster.parse(3, 1, rates="1gbit,1gbit,100mbit")
    ranked = rank(p, cluster, candidates(cluster, p))
    choice = choose(p, cluster)
    assert choice.candidate == ranked[0].candidate
    assert choice.runner_up.candidate == ranked[1].candidate
    line = choice.line()
    assert line.count("\n") == 0 and ranked[0].candidate.label in line
    assert f"{1e3 * ranked[0].step_s:.2f} ms/step" in line and ranked[0].bottleneck in line
    assert choose(p, cluster, compression="fp16").candidate.compression == "fp16"
    assert choose(p, cluster, compression="none").candidate.compression == "none"
    assert choose(p, cluster, servers=2, compression="none").candidate == Candidate(
        "ps", servers=2)
    assert choose(p, cluster, algorithm="ring").candidate.algorithm == "ring"
    with pytest.raises(ValueError, match="no measurement of --compression topk:0.01"):
        choose(p, cluster, compression="topk:0.01")
    # One host, a PS beside --workers 2: predicted with its server as a third rank.
    one = Cluster.parse(1, 2, shared=True)
    ps = choose(p, one, arch="ps", extra_servers=True)
    assert ps.best.workers == 2 and ps.candidate.servers == 1


def test_auto_refuses_what_it_cannot_plan_in_one_line(monkeypatch):
    from gradsync.train.config import LaunchConfig, PSConfig, TrainConfig

    with pytest.raises(ValueError, match="--arch auto plans for a fixed set of ranks"):
        TrainConfig(arch="auto", launch=LaunchConfig(elastic=True))
    with pytest.raises(ValueError, match="--consistency async needs --arch ps"):
        TrainConfig(arch="auto", ps=PSConfig(consistency="async"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="gradsync's own launcher"):
        TrainConfig(arch="auto")


def _train(*args, timeout=100):
    return subprocess.run([sys.executable, "-m", "gradsync", "train", *args],
                          capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=scaled(timeout))


@pytest.mark.timeout(150)
def test_train_arch_auto_on_loopback_runs_the_choice_and_says_why(tmp_path):
    """One host: auto plans, says so in one line, picks no compression, and the run's
    summary names what it chose; a bad combination is one line, exit 2."""
    run = _train("--arch", "auto", "--workers", "2", "--steps", "6", "--no-progress",
                 "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if "--arch auto" in line]
    assert len(said) == 1 and said[0].startswith("gradsync: --arch auto chose "), run.stderr
    assert "ms/step predicted" in said[0] and "runner-up" in said[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    chosen = summary["auto"]["chosen"]
    assert chosen["configuration"] in said[0] and "--compression" not in chosen["flags"]
    assert summary["arch"] == chosen["flags"][1] != "auto"
    assert summary.get("compression", "none") == "none"
    bad = _train("--arch", "auto", "--elastic", "--steps", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--arch auto plans for a fixed set of ranks" in bad.stderr
    none_left = _train("--arch", "auto", "--compression", "powersgd:2", "--servers", "2",
                       "--steps", "2")
    assert none_left.returncode == 2 and none_left.stderr.count("\n") == 1, none_left.stderr
    assert "--arch auto: no configuration" in none_left.stderr


def test_on_one_host_a_half_cast_saves_no_work_and_auto_does_not_pick_it():
    """One host has no wire: fp16 halves no adds, and its shm bucket loses the resident
    shared-memory path, so even a free cast ranks below its uncompressed twin."""
    big = _profile(codecs={"fp16": (0.0, 0.5), "bf16": (0.0, 0.5)})
    one = Cluster.parse(1, 2, shared=True)
    for algo in ("shm", "native"):
        plain = predict(big, one, Candidate("allreduce", algo))
        for half in ("fp16", "bf16"):
            assert predict(big, one, Candidate("allreduce", algo, compression=half)
                           ).step_s >= plain.step_s
    from gradsync.plan import choose

    assert choose(big, one, extra_servers=True).candidate.compression == "none"


def test_buckets_close_as_dataparallels_do():
    # The first bucket closes at 1 MiB (one 2 MB parameter), the next ones at the cap.
    p = _profile()
    assert p.buckets(25 * MB) == [(0.001, 2 * MB), (0.004, 6 * MB)]
    assert p.buckets(4 * MB) == [(0.001, 2 * MB), (0.003, 4 * MB), (0.004, 2 * MB)]


def test_compressed_hooks_encode_in_backward_and_wait_a_hop_per_message():
    """No alpha, beta or gamma: what is left is the hooks' own shape. Bucket 0 (2 MB, ready
    at 1 ms) and bucket 1 (6 MB, at 4 ms); a 4 ms codec, compute x2 on 4 ranks and 2 cores,
    a hop per message h = 2 s ENDPOINT_CPU_S + WAKE_S (1 - 1/s) at s = 2 (a native
    all-reduce of 4 ranks: 6 messages; an all-gather: 3). One host of 4 ranks: no wire and
    no CPU floor (the lab's), the hooks' shape alone."""
    from gradsync.comm.algorithms.registry import REGISTRY
    from gradsync.comm.cost_model import CostModel
    free = CostModel({a: (0.0, 0.0) for a in REGISTRY}, gamma=0.0)
    prof = _profile(codecs={"powersgd:2": (0.004, 0.01, 0.5), "topk:0.01": (0.004, 0.03, 1.0)})
    shared = Cluster((1e15,), procs_per_host=4, latency_s=0.0, cores=2)
    h, ms = 4 * shared.machine.endpoint_cpu_s + shared.machine.wake_s / 2, 1e-3
    # PowerSGD: calls 1 + 3 ms inside an 8 ms backward; the last call (at 12 ms) starts the
    # all-reduce of every P; after it the whole decode (4 ms) and Q's all-reduce: two
    # collectives a step, whatever the buckets.
    end = 12 * ms + 6 * h + 4 * ms + 6 * h
    psgd = predict(prof, shared, Candidate("allreduce", "native", compression="powersgd:2"),
                   free)
    assert psgd.step_s == pytest.approx(4 * ms + end + 2 * ms)
    assert psgd.exposed_s == pytest.approx(end - 8 * ms)
    many = predict(prof, shared, Candidate("allreduce", "native", compression="powersgd:2",
                                           bucket_mb=2), free)  # 4 buckets, same path
    assert many.step_s == pytest.approx(psgd.step_s)
    # top-k: the whole codec is the selection (2 + 6 ms in backward), two gathers a bucket
    # (bucket 0's end inside backward), nothing to decode after them.
    topk = predict(prof, shared, Candidate("allreduce", "native", compression="topk:0.01"),
                   free)
    assert topk.step_s == pytest.approx(4 * ms + 16 * ms + 6 * h + 2 * ms)
    # A core per rank: no hop, and the codec's decode is all that follows backward.
    alone = Cluster((1e15, 1e15), latency_s=0.0)
    psgd = predict(prof, alone, Candidate("allreduce", "native", compression="powersgd:2"),
                   free)
    assert psgd.step_s == pytest.approx(2 * ms + (4 + 2) * ms + 2 * ms + 1 * ms)


def test_gradsyncs_own_collectives_make_no_hand_off_to_gloos_thread():
    """On shared cores a native collective hands over to gloo's thread and back (two
    wake-ups, held in the hop constants fitted on native runs); a ring runs on the caller's
    thread: PowerSGD's two all-reduces take 2 x 2 WAKE_S less. With a core per rank no
    wake-up waits, and the two are level (same messages, alphas free)."""
    from gradsync.comm.algorithms.registry import REGISTRY
    from gradsync.comm.cost_model import CostModel
    free = CostModel({a: (0.0, 0.0) for a in REGISTRY}, gamma=0.0)
    prof = _profile(codecs={"powersgd:2": (0.004, 0.01, 0.5)})
    shared = Cluster((1e15,), procs_per_host=4, latency_s=0.0, cores=2)
    alone = Cluster((1e15, 1e15), latency_s=0.0)
    steps = {(c.cores, a): predict(prof, c, Candidate("allreduce", a, compression="powersgd:2"),
                                   free).step_s
             for c in (shared, alone) for a in ("native", "ring")}
    assert steps[2, "native"] - steps[2, "ring"] == pytest.approx(4 * shared.machine.wake_s)
    assert steps[None, "native"] == pytest.approx(steps[None, "ring"])


def test_powersgd_splits_its_wire_between_its_two_all_reduces():
    """1 MB/s links, 2 hosts: a native all-reduce puts its bytes on the wire (2 (p-1)/p = 1x);
    the first all-reduce carries the recorded share of the wire (P and the vectors), the
    second the rest (Q): the sum is the whole wire whatever the share."""
    from gradsync.comm.algorithms.registry import REGISTRY
    from gradsync.comm.cost_model import CostModel

    free = CostModel({a: (0.0, 0.0) for a in REGISTRY}, gamma=0.0)
    cluster = Cluster((1e6, 1e6), latency_s=0.0)
    steps = []
    for first in (0.5, 0.8):
        prof = _profile(codecs={"powersgd:2": (0.0, 0.01, 0.5, first)})
        assert prof.first_share("powersgd:2") == first
        steps.append(predict(prof, cluster, Candidate("allreduce", "native",
                                                      compression="powersgd:2"), free).step_s)
    wire = 0.01 * 8 * MB / 1e6
    assert steps == pytest.approx([0.002 + 0.004 + wire + 0.001] * 2, rel=1e-4)  # whole bytes


def test_lab_runs_procs_per_host_ranks_on_each_host(monkeypatch):
    """`--lab N --procs-per-host P` (plumbing only, no lab): the flag is a field of the
    train config, refused without --lab, handed to the lab with N x P ranks' threads, and
    `plan --validate` / `--emit flags` pass the plan's ranks per host on."""
    import gradsync.lab as lab_mod
    from gradsync.cli import _parser
    from gradsync.flags import dataclass_from_args, to_argv
    from gradsync.plan.validate import train_argv
    from gradsync.train import launch
    from gradsync.train.config import TrainConfig

    def config(*argv):
        return dataclass_from_args(TrainConfig, _parser().parse_args(["train", *argv]))

    two = config("--lab", "3", "--rate", "200mbit", "--procs-per-host", "2")
    assert two.lab.procs_per_host == 2 and "--procs-per-host=2" in to_argv(two)
    with pytest.raises(ValueError, match="--procs-per-host needs --lab"):
        config("--procs-per-host", "2")
    seen = {}

    def fake_train_in_lab(hosts, rate, rates, argv, env, *, procs_per_host=1):
        seen.update(hosts=hosts, per=procs_per_host, threads=env["OMP_NUM_THREADS"])
        return 0

    monkeypatch.setattr(lab_mod, "train_in_lab", fake_train_in_lab)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.run_in_lab(two) == 0
    assert seen == {"hosts": 3, "per": 2, "threads": str(max(1, os.cpu_count() // 6))}
    prof = _profile()
    cluster = Cluster.parse(3, 2, "200mbit", shared=True)
    pred = predict(prof, cluster, Candidate("allreduce", "hierarchical"))
    argv = train_argv(prof, cluster, pred, 20, ["200mbit"] * 3)
    assert argv[-6:] == ["--lab", "3", "--rates", "200mbit,200mbit,200mbit",
                         "--procs-per-host", "2"]


def test_a_lab_step_is_at_least_every_ranks_cpu_over_the_cores():
    """5 lab hosts on 2 cores, links, alphas and the wake-up free: tiny messages, so the
    step is the CPU budget, (5 x (profiled step + the loop) + 5 x 8 x 2 message ends) / 2
    cores for a native all-reduce of one bucket (8 messages a rank on its critical path,
    each sent and received); a real cluster (no shared cores) has no such floor."""
    from gradsync.comm.algorithms.registry import REGISTRY
    from gradsync.comm.cost_model import CostModel
    from gradsync.plan.machine import SharedCores

    free = CostModel({a: (0.0, 0.0) for a in REGISTRY}, gamma=0.0)
    ms = 1e-3
    prof = _profile(forward_s=0.0, backward_s=0.1 * ms, optimizer_s=0.0,
                    grads=[(0.1 * ms, 1000)])
    m = SharedCores(endpoint_cpu_s=0.2 * ms, ps_endpoint_cpu_s=0.3 * ms, loop_cpu_s=0.9 * ms,
                    wake_s=0.0)
    lab = Cluster((1e15,) * 5, latency_s=0.0, cores=2, machine=m)
    pred = predict(prof, lab, Candidate("allreduce", "native"), free)
    floor = (5 * (0.1 * ms + 0.9 * ms) + 5 * 8 * 2 * 0.2 * ms) / 2
    assert pred.step_s == pytest.approx(floor) and pred.bottleneck.startswith("CPU")
    real = predict(prof, Cluster((1e15,) * 5, latency_s=0.0), Candidate("allreduce", "native"),
                   free)
    assert real.step_s < floor / 5


def test_a_loaded_profile_is_read_at_the_labs_ranks_per_core(tmp_path):
    """The loaded measurement (loaded.py) by hand: DataParallel's step CPU without a hook 8
    ms at 1 rank per core and 10 at 2, with PowerSGD 14 and 18 (of which 1 + 3 and 2 + 4 ms
    in the hook's calls and waits). At 3 ranks on 2 cores (1.5 a core) PowerSGD adds
    16 - 9 = 7 ms, 30 % of its hook in the calls, and a rank's compute is 9 ms where the
    profile's phases are 7: backward and every gradient's ready time stretched by 6 / 4.
    Read at the nearest measured load outside them; on a real cluster (or idle cores) the
    one-rank timing; the PS's pushes (no DataParallel, no hook) keep the one-rank figures."""
    from dataclasses import replace

    from gradsync.plan.loaded import stretched
    from gradsync.plan.shared import load

    ms = 1e-3
    codecs = {"powersgd:2": (0.003, 0.01, 0.5, 0.6), "fp16": (0.0, 0.5)}
    prof = _profile(codecs=codecs, loaded={
        "none": [(1.0, 0.0, 0.0, 8 * ms), (2.0, 0.0, 0.0, 10 * ms)],
        "powersgd:2": [(1.0, 1 * ms, 3 * ms, 14 * ms), (2.0, 2 * ms, 4 * ms, 18 * ms)]})
    lab = Cluster((1e15,) * 3, latency_s=0.0, cores=2)
    assert load(lab) == 1.5 and load(Cluster((1e15,) * 3, cores=4)) is None
    assert load(Cluster((1e15,) * 3)) is None
    assert prof.codec("powersgd:2", 1.5) == pytest.approx((7 * ms, 0.3))
    assert prof.codec("powersgd:2", 3.0) == pytest.approx((8 * ms, 2 / 6))
    assert prof.codec("powersgd:2", 0.5) == pytest.approx((6 * ms, 0.25))
    assert prof.codec("powersgd:2") == (0.003, 0.5)
    assert prof.codec("fp16", 1.5) == (0.0, 0.5)  # not measured under load: one-rank
    assert prof.codec("none", 1.5) == (0.0, 0.5)
    longer = stretched(prof, 1.5)
    assert longer.backward_s == pytest.approx(6 * ms)
    assert [t for t, _ in longer.grads] == pytest.approx([1.5 * ms * (i + 1) for i in range(4)])
    assert stretched(prof, None) is prof
    # predict() reads both: the same as a hand-made profile with those figures, unloaded.
    same = replace(longer, loaded={}, codecs={**codecs, "powersgd:2": (7 * ms, 0.01, 0.3, 0.6)})
    for cand in (Candidate("allreduce", "native", compression="powersgd:2"),
                 Candidate("allreduce", "ring")):
        assert predict(prof, lab, cand).step_s == pytest.approx(predict(same, lab, cand).step_s)
    ps = Candidate("ps", servers=1)
    assert predict(prof, lab, ps).step_s == predict(replace(prof, loaded={}), lab, ps).step_s
    prof.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == prof
