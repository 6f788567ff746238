"""`gradsync bench`: the collectives sweep and the training benchmark, as a user runs them.

A run's table, JSON and plot must agree: the same sizes and algorithms, busbw = S/t * factor
within the table's rounding, #wrong 0. Every collective, dtype and redop of the sweep is
checked against its closed form on 3 ranks, and a corrupted element is counted. The lab test
needs root and network namespaces, and skips otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsync.bench.busbw import aware_bound, lab_bounds
from gradsync.bench.sweep import ALGORITHMS, Case, SweepConfig, _reduced, run_sweep
from gradsync.cli import main
from tests.distributed import run_workers, scaled
from tests.helpers import gradsync, needs_netns


def _table(stdout: str) -> list[list[str]]:
    """The data rows: every other line starts with '#' (bench train: but its header)."""
    return [line.split() for line in stdout.splitlines() if line.strip()
            and not line.startswith("#") and line.split()[0] != "arch"]


def _averages(stdout: str) -> dict[str, float]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("# Avg bus bandwidth : ")]
    return {ln.split()[6]: float(ln.split()[5]) for ln in lines}


def _plotted(path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["Description"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_sweep_table_json_and_plot_agree(tmp_path):
    js, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    run = gradsync("bench", "collectives", "--workers", "2", "-b", "1K", "-e", "256K", "-n", "3",
                   "-w", "1", "--check", "--json", str(js), "--plot", str(png), timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(js.read_text())
    rows, table = report["rows"], _table(run.stdout)
    # One host: shm runs, and from 256 KiB beside it its floor measured in the same run
    # (below, the floor's pass would time torch's per-call overhead, not memory).
    algos = list(ALGORITHMS["all_reduce"]) + ["memory-bound"]
    expected = [(s, a) for s in (1024, 4096, 16384, 65536, 262144) for a in algos
                if a != "memory-bound" or s == 262144]
    assert [(int(c[0]), c[5]) for c in table] == expected
    assert [(r["bytes"], r["algorithm"]) for r in rows] == expected
    n = report["world"]
    assert n == 2
    for cells, row in zip(table, rows):
        _, count, dtype, redop, root, _, t_us, algbw, busbw, wrong = cells[:10]
        assert (int(count), dtype, redop, root) == (row["bytes"] // 4, "float32", "sum", "-1")
        t = row["time_us"]["median"]
        assert row["algbw_gbs"] == pytest.approx(row["bytes"] / (t * 1e-6) / 1e9, rel=1e-9)
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"] * 2 * (n - 1) / n, rel=1e-9)
        assert float(t_us) == pytest.approx(t, abs=0.051)
        assert float(algbw) == pytest.approx(row["algbw_gbs"], abs=5.1e-5)
        assert float(busbw) == pytest.approx(row["busbw_gbs"], abs=5.1e-5)
        assert int(wrong) == row["wrong"] == 0
    averages = _averages(run.stdout)
    assert list(averages) == algos == list(report["avg_busbw_gbs"])
    for algo, avg in report["avg_busbw_gbs"].items():
        mine = [r["busbw_gbs"] for r in rows if r["algorithm"] == algo]
        assert avg == pytest.approx(sum(mine) / len(mine)) and averages[algo] == round(avg, 4)
    assert run.stdout.strip().splitlines()[-1].startswith("# Avg bus bandwidth : ")
    assert _plotted(png) == {a: [[r["bytes"], r["busbw_gbs"]] for r in rows
                                 if r["algorithm"] == a] for a in algos}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_engine_mpi_runs_the_ranks_under_mpiexec(tmp_path):
    pytest.importorskip("mpi4py")
    js = tmp_path / "mpi.json"
    run = gradsync("bench", "collectives", "--engine", "mpi", "-b", "256K", "-e", "256K", "-n", "2",
                   "-w", "1", "--algorithm", "native,shm", "--check", "--json", str(js),
                   timeout=50)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(js.read_text())
    assert report["engine"] == "mpi" and report["world"] == 2
    assert [r["algorithm"] for r in report["rows"]] == ["native", "shm", "memory-bound"]
    assert all(r["wrong"] == 0 for r in report["rows"])
    assert "--engine mpi" in report["command"]


@pytest.mark.timeout(10)
def test_algorithm_names_are_gradsyncs():
    from gradsync.comm import ALL_REDUCE_ALGORITHMS

    assert set(ALGORITHMS["all_reduce"]) == set(ALL_REDUCE_ALGORITHMS)


@pytest.mark.timeout(10)
def test_closed_form():
    # 3 ranks, v(r, i) = (i + r) mod 4 + 1: i = 0 holds 1, 2, 3 across the ranks, i = 1 holds
    # 2, 3, 4, i = 2 holds 3, 4, 1, i = 3 holds 4, 1, 2.
    assert _reduced(0, 5, 3, 4, "sum", torch.float32).tolist() == [6, 9, 8, 7, 6]
    assert _reduced(1, 3, 3, 4, "max", torch.int32).tolist() == [4, 4, 4]
    assert _reduced(0, 4, 3, 4, "min", torch.int64).tolist() == [1, 2, 1, 1]
    assert _reduced(0, 2, 3, 2, "prod", torch.float16).tolist() == [2, 4]  # 1*2*1, 2*1*2
    assert _reduced(0, 2, 3, 4, "avg", torch.float64).tolist() == [2, 3]


@pytest.mark.timeout(10)
def test_bandwidth_aware_bound():
    # Equal links: the ring's bound, the link itself. One link 4x slower on 4 hosts: the slow
    # host owns no shard and moves S each way, 1.5x better than a ring at the slow link.
    assert aware_bound([10.0] * 3) == pytest.approx(10.0)
    assert aware_bound([4.0, 4.0, 4.0, 1.0]) == pytest.approx(1.5)
    assert aware_bound([4.0, 1.0]) == pytest.approx(1.0)
    bounds = lab_bounds("all_reduce", [8_000_000_000, 2_000_000_000, 2_000_000_000])
    assert bounds["bound_busbw_gbs"] == pytest.approx(0.25)
    assert bounds["aware_busbw_gbs"] > bounds["bound_busbw_gbs"]


_CASES = [("all_reduce", "float32", "sum"), ("all_reduce", "bfloat16", "avg"),
          ("all_reduce", "int64", "prod"), ("reduce_scatter", "float16", "max"),
          ("reduce_scatter", "int32", "min"), ("all_gather", "float64", "sum"),
          ("broadcast", "int32", "sum"), ("reduce", "bfloat16", "prod")]


def _every_case(rank: int, world: int) -> list[int]:
    wrong = []
    for op, dtype, redop in _CASES:
        cfg = SweepConfig(minbytes=1000, maxbytes=1000, iters=2, warmup_iters=0, op=op,
                          dtype=dtype, redop=redop, check=True)
        raw = run_sweep(cfg)
        # (shm's memory-bound floor is measured from 256 KiB only)
        assert [r["algorithm"] for r in raw["rows"]] == list(ALGORITHMS[op])
        wrong += [r["wrong"] for r in raw["rows"]]
        # The check sees a wrong element: corrupt one on every rank that holds a result.
        case = Case(cfg, 7, rank, world)
        case.reset()
        case.run("native")
        assert case.wrong() == 0
        for out in case.outputs[:1]:
            out[3] += 1
        assert case.wrong() == (1 if case.outputs else 0)
    return wrong


@pytest.mark.timeout(60)
def test_every_collective_dtype_and_redop_is_exact():
    for wrong in run_workers(_every_case, 3, timeout=50):
        assert wrong and set(wrong) == {0}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,needle", [
    (["-b", "huge"], "cannot parse size 'huge'"),
    (["-b", "64M", "-e", "1K"], "-b <= -e"),
    (["-f", "1"], "-f >= 2"),
    (["--op", "gather"], "invalid choice: 'gather'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--algorithm", "butterfly"], "butterfly"),
    (["--op", "all_gather", "--algorithm", "ring"], "all_gather offers native"),
    (["--dtype", "int32", "--redop", "avg"], "floating-point"),
    (["--workers", "1"], "at least 2 ranks"),
    (["--rate", "1gbit"], "need --lab"),
    (["--lab", "3", "--rates", "1gbit,1gbit"], "one per host"),
    (["--lab", "2", "--rate", "fast"], "cannot parse rate 'fast'"),
    (["--op", "broadcast", "--calibrate"], "--calibrate"),
])
def test_bad_flags_are_one_line_with_exit_2(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    try:
        rc = main(["bench", "collectives", *argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("gradsync: error: ") and needle in err, err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_train_table_json_and_plot_agree(tmp_path):
    js, png = tmp_path / "train.json", tmp_path / "train.png"
    run = gradsync("bench", "train", "--rounds", "1", "--steps", "4", "--workers", "2",
                   "--archs", "allreduce", "--json", str(js), "--plot", str(png), timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(js.read_text())["rows"]
    table = _table(run.stdout)
    assert [(c[0], int(c[1])) for c in table] == [(r["arch"], r["workers"]) for r in rows] \
        == [("local", 1), ("allreduce", 2)]
    local = rows[0]["samples_per_s"]
    for cells, row in zip(table, rows):
        assert float(cells[2].replace(",", "")) == pytest.approx(row["samples_per_s"], abs=0.51)
        assert float(cells[4]) == pytest.approx(row["step_ms"], abs=0.051)
        # samples/s is the global batch over the median step time
        assert row["samples_per_s"] == pytest.approx(64 * row["workers"] / row["step_ms"] * 1e3)
        assert row["efficiency"] == pytest.approx(row["samples_per_s"] / (row["workers"] * local))
        assert float(cells[5]) == pytest.approx(row["efficiency"], abs=0.0051)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_lab_busbw_against_the_link(tmp_path):
    """3 hosts at 200 Mbit/s, 4 MiB: the figures are computed right against the link, no
    algorithm beats its bound, and ring and native clearly beat reduce_broadcast, whose single
    root is the bottleneck (its bound is 1/n of the link).

    How close ring and native come to the link is a benchmark's target, not a test's: it
    depends on the machine's load (docs/benchmarks.md, section 4, keeps it with its command).
    """
    js = tmp_path / "lab.json"
    env = {**os.environ, "GRADSYNC_LAB_DIR": str(tmp_path / "labs")}
    run = subprocess.run([sys.executable, "-m", "gradsync", "bench", "collectives", "--lab", "3",
                          "--rate", "200mbit", "-b", "4M", "-e", "4M", "-n", "3", "-w", "0",
                          "--algorithm", "ring,native,reduce_broadcast", "--check",
                          "--json", str(js)], capture_output=True, text=True,
                         timeout=scaled(110), env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(js.read_text())
    link = 200e6 / 8 / 1e9
    assert report["lab"]["bound_busbw_gbs"] == pytest.approx(link)
    n, rows = report["world"], {r["algorithm"]: r for r in report["rows"]}
    assert n == 3 and set(rows) == {"ring", "native", "reduce_broadcast"}
    for row in rows.values():
        assert row["wrong"] == 0
        t = row["time_us"]["median"]
        assert row["algbw_gbs"] == pytest.approx(row["bytes"] / (t * 1e-6) / 1e9, rel=1e-9)
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"] * 2 * (n - 1) / n, rel=1e-9)
        assert row["of_link"] == pytest.approx(row["busbw_gbs"] / link, rel=1e-9)
    frac = {a: round(r["of_link"], 3) for a, r in rows.items()}
    # Upper bounds hold on any machine, however busy: tbf lets nothing through faster than
    # the link (Ethernet framing costs 4.4 %, more than its 128 KiB bursts add to a 4 MiB
    # transfer), and reduce_broadcast's root moves 2(n-1) S, which caps it at 1/n of the link.
    assert all(f <= 1.0 for f in frac.values()), frac
    assert frac["reduce_broadcast"] <= 1.1 / n, frac
    # A comparison within one run, with a wide margin: on a quiet machine ring and native
    # measure about 2.9x reduce_broadcast (0.9+ against 0.32).
    assert frac["ring"] >= 1.5 * frac["reduce_broadcast"], frac
    assert frac["native"] >= 1.5 * frac["reduce_broadcast"], frac
    prefix = report["lab"]["prefix"] + "-"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout
    assert not [ln for ln in left.splitlines() if ln.startswith(prefix)]
    assert not list((tmp_path / "labs").glob("*.json"))


def test_hierarchical_bound_in_a_lab_of_several_ranks_per_host():
    # 2 hosts x 2 ranks at 1 Gbit/s: host links carry 2(h-1)/h S = S, busbw counts
    # 2(p-1)/p = 1.5 S: the bound is 1.5x the link.
    bounds = lab_bounds("all_reduce", [1_000_000_000] * 2, procs_per_host=2)
    assert bounds["aware_busbw_gbs"] == pytest.approx(1.5 * bounds["bound_busbw_gbs"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_topology_on_one_host_and_its_file(tmp_path):
    from gradsync.comm import Topology

    saved = tmp_path / "topo.json"
    run = gradsync("bench", "topology", "--workers", "2", "--save", str(saved), timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 ranks on 1 hosts" in run.stdout and "0,1" in run.stdout
    assert [h.ranks for h in Topology.load(saved).validate(2).hosts] == [(0, 1)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,needle", [
    (["--budget", "0"], "--budget must be positive"),
    (["--rates", "1gbit,1gbit"], "need --lab N"),
    (["--procs-per-host", "2"], "need --lab N"),
])
def test_bench_topology_bad_flags(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rc = main(["bench", "topology", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_run_for_result_reads_rank_0s_file_or_says_why_not(capsys):
    from gradsync.bench.ranks import run_for_result
    from gradsync.lab import LabError

    def writes(argv):  # a rank 0 that writes its results where the flag says
        assert argv[:2] == ["bench", "x"] and argv[2] == "--result-file"
        Path(argv[3]).write_text(json.dumps({"world": 2}))
        return 0, {"name": "lab"}

    def no_lab(argv):
        raise LabError("need root for a lab")

    assert run_for_result(["bench", "x"], launch=writes) == (0, {"world": 2}, {"name": "lab"})
    assert run_for_result(["bench", "x"], launch=lambda argv: (3, None)) == (3, None, None)
    assert capsys.readouterr().err == ""
    for launch, status, needle in [(no_lab, 2, "need root for a lab"),
                                   (lambda argv: (0, None), 1, "results unreadable")]:
        assert run_for_result(["bench", "x"], launch=launch) == (status, None, None)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_lab_probe_finds_the_slow_host_and_aware_hierarchical_are_exact(tmp_path):
    """In a lab of 3 hosts x 2 ranks with links of 100, 100 and 25 Mbit/s: the probe groups the
    ranks by host and finds each link (loosely: a busy machine delays the timing; the 10 %
    figure is a benchmark's, docs/benchmarks.md), and aware, hierarchical and auto give
    exact results over real links, with auto on the measured topology."""
    env = {**os.environ, "GRADSYNC_LAB_DIR": str(tmp_path / "labs")}
    js = tmp_path / "lab.json"
    run = subprocess.run([sys.executable, "-m", "gradsync", "bench", "collectives", "--lab", "3",
                          "--procs-per-host", "2", "--rates", "100mbit,100mbit,25mbit", "-b", "256K",
                          "-e", "256K", "-n", "2", "-w", "0", "--check", "--algorithm",
                          "native,aware,hierarchical,auto", "--json", str(js)],
                         capture_output=True, text=True, timeout=scaled(140), env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(js.read_text())
    assert {r["algorithm"]: r["wrong"] for r in report["rows"]} == {
        "native": 0, "aware": 0, "hierarchical": 0, "auto": 0}
    hosts = report["topology"]["hosts"]
    assert [h["ranks"] for h in hosts] == [[0, 1], [2, 3], [4, 5]]
    # A fan-in into a host runs at min(its link, the others' together): 100, 100, 25. A busy
    # machine only lowers a measured rate (CI saw 48.6 for a 100 Mbit host), so the bounds are
    # the shaped links above and the slow host found below the others.
    *fast, slow = (h["rate_mbit"] for h in hosts)
    assert all(slow < f <= 105 for f in fast) and 0 < slow <= 26.5, hosts
    assert not list((tmp_path / "labs").glob("*.json"))


def test_bench_train_zero_specs_run_the_stage_and_bound_stage_3_at_1_5x():
    from argparse import Namespace

    from gradsync.bench.train import Config, table

    assert Config("zero:2", 3).flags() == ["--arch", "allreduce", "--zero", "2"]
    run = {"samples_per_s_median_step": 100.0, "step_time_ms_median": 50.0, "steps_run": 10,
           "comm_wait_s": 0.1, "bytes_per_step_per_worker": 1, "parameters": 1_000_000}
    rows = table({Config(s, 3): [run] for s in ("allreduce", "zero:1", "zero:3")},
                 Namespace(lab_rate="1gbit", lab_rates=None))
    bounds = {r["arch"]: r["bound_ms"] for r in rows}
    assert bounds["zero:1"] == bounds["allreduce"]
    assert bounds["zero:3"] == pytest.approx(1.5 * bounds["allreduce"])
