"""--timeline and --tensorboard (gradsync/observe/): the timeline stays valid JSON at every
moment, a SIGKILL included; a run's timeline has a row per rank whose step events account
for the measured step time, bucket events that name the summary's algorithms, and clocks
aligned; TensorBoard's own reader finds the scalars."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import torch

from gradsync.observe import (StragglerWatch, TensorBoardLog, Timeline, find_stragglers, load,
                              merge_ranks, rank_path, waited_for, write_run_plots)
from tests.distributed import scaled
from tests.helpers import ENV, REPO, gradsync, run_and_kill, steps_of

# A child that writes a timeline without end: it says "ready" after 50 flushes, then goes on
# until killed, so the kill lands among its writes.
WRITER = """
import sys, time
from gradsync.observe import Timeline
tl = Timeline(sys.argv[1])
n = 0
while True:
    t = time.perf_counter()
    for k in range(8):
        tl.record("e", t, t + 1e-4, tid=100 + k, bytes=n, algorithm="ring" * (n % 7))
    tl.flush()
    n += 1
    if n == 50:
        print("ready", flush=True)
"""


def test_the_file_parses_after_every_flush_and_holds_the_events(tmp_path):
    path = tmp_path / "t.json"
    with Timeline(path, rank=3) as tl:
        first = len(load(path))  # the metadata rows, flushed at once
        t = time.perf_counter()
        for step in range(1, 4):
            tl.step = step
            tl.record("forward", t, t + 0.002, tid=0)
            tl.record("all-reduce", t, t + 0.001, tid=101, algorithm="ring", bytes=4096)
            tl.flush()
            events = load(path)  # still open: no closing step yet
            assert len(events) == first + 2 * step
    spans = [e for e in load(path) if e["ph"] == "X"]
    assert {e["pid"] for e in load(path)} == {3}
    assert [e["args"]["step"] for e in spans] == [1, 1, 2, 2, 3, 3]
    assert spans[0]["dur"] == pytest.approx(2000.0, abs=0.2)
    assert spans[1]["args"] == {"algorithm": "ring", "bytes": 4096, "step": 1}
    # One event per line, as the trace format's JSON array form (a truncated copy loads too).
    lines = path.read_text().splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == len(load(path)) + 2


@pytest.mark.timeout(60)
def test_a_writer_killed_mid_run_leaves_a_file_that_parses(tmp_path):
    path = tmp_path / "killed.json"
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=ENV, cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=scaled(10))
        finally:
            proc.kill()
        events = load(path)
        assert sum(e["ph"] == "X" for e in events) >= 50 * 8


def test_merge_ranks_puts_every_rank_file_found_into_one(tmp_path):
    path = tmp_path / "trace.json"
    for rank in (0, 1, 3):  # rank 2's file is elsewhere (another host)
        with Timeline(rank_path(path, rank), rank=rank) as tl:
            tl.record("forward", 1.0, 1.5)
    assert merge_ranks(path, 4) == [0, 1, 3]
    events = load(path)
    assert {e["pid"] for e in events} == {0, 1, 3}
    assert sum(e["name"] == "forward" for e in events) == 3


def _scalars(root):
    """{tag: [(step, value)]} of the one run under ``root``, read by TensorBoard itself."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    [run_dir] = [p for p in root.iterdir() if p.is_dir()]
    acc = accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_split_each_step_from_the_cumulative_counters(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    tb = TensorBoardLog(tmp_path, global_batch=64, lr=0.05)
    for n, (wait, sent) in enumerate([(0.01, 1000), (0.03, 3000), (0.03, 4000)], start=1):
        tb.step({"step": n, "loss": 1.0 / n, "step_time_s": 0.04, "comm_wait_s": wait,
                 "bytes_sent": sent, "compress_s": 0.0})
    tb.finish({"steps": 3, "eval_accuracy": 0.75, "eval_loss": 0.5})
    got = _scalars(tmp_path)
    approx = lambda v: pytest.approx(v, rel=1e-6)  # noqa: E731 - stored as float32
    assert got["time/wait_s"] == [(1, approx(0.01)), (2, approx(0.02)), (3, approx(0.0))]
    assert got["time/compute_s"] == [(1, approx(0.03)), (2, approx(0.02)), (3, approx(0.04))]
    assert got["comm/bytes_per_step"] == [(1, 1000), (2, 2000), (3, 1000)]
    assert got["perf/samples_per_s"][0] == (1, approx(1600))
    assert got["train/loss"][1] == (2, 0.5) and got["train/lr"][2] == (3, approx(0.05))
    assert got["eval/accuracy"] == [(3, 0.75)] and "comm/compression_ratio" not in got


def test_a_comm_hooks_call_is_a_span_inside_backward_and_plain_launches_are_not(tmp_path):
    from gradsync.allreduce.bucket_reduce import BucketTrace

    class Done:
        def is_completed(self):
            return True

    bucket = type("B", (), {"flat": torch.zeros(4)})()
    with Timeline(tmp_path / "t.json") as tl:
        trace = BucketTrace(tl, [bucket, bucket], ["ring", "ring"])
        start = time.perf_counter()
        trace.launched(Done(), start, hooked=True)     # a compressor's hook: encode + launch
        trace.launched(Done(), time.perf_counter())   # no hook: the collective only
        trace.finish_step(time.perf_counter(), time.perf_counter())
    spans = [e for e in load(tmp_path / "t.json") if e["ph"] == "X"]
    hooks = [e for e in spans if e["name"] == "comm hook (compress)"]
    assert [(e["tid"], e["args"]["bucket"]) for e in hooks] == [(0, 0)]
    assert hooks[0]["ts"] >= 0 and hooks[0]["dur"] >= 0
    assert [e["args"]["bucket"] for e in spans if e["name"] == "all-reduce"] == [0, 1]


def test_waited_for_charges_each_step_to_its_last_rank():
    compute = torch.tensor([[1.0, 1.0, 4.0],     # (ranks, steps)
                            [2.0, 1.0, 1.0],
                            [1.0, 1.0, 1.0]])
    # step 1: rank 1 last, the others waited 1 s each; step 3: rank 0, 3 s each; step 2: tie
    assert waited_for(compute) == [3.0, 1.0, 0.0]
    assert waited_for(compute[:1]) == [0.0]


class _FakeWatch(StragglerWatch):
    """StragglerWatch over fake timings of every rank: no processes."""

    def __init__(self, times, window):
        group = type("G", (), {"rank": 0, "size": times.shape[0]})()
        super().__init__(group, window)
        self.times = times

    def _gather(self, mine):
        steps = len(self.compute)
        return self.times[:, steps - len(mine):steps]


def _noisy(ranks, steps, slow=None, factor=1.5, from_step=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.01 * (1 + 0.15 * torch.rand(ranks, steps, generator=g, dtype=torch.float64))
    if slow is not None:
        t[slow, from_step:] *= factor
    return t


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_a_rank_at_half_speed_is_named_within_20_steps_and_none_otherwise(ranks, caplog):
    assert find_stragglers(_noisy(ranks, 40)) == []
    found = find_stragglers(_noisy(ranks, 40, slow=ranks - 1))
    assert [r for r, _ in found] == [ranks - 1]
    # (an even count's median is the lower middle value: with 2 ranks, the faster one)
    assert found[0][1] == pytest.approx(1.5, rel=0.1)
    # a slow step or two in a window is noise (each rank's slowest tenth is left out) ...
    spiky = _noisy(ranks, 40)
    spiky[0, ::20] *= 10
    spiky[1, 7] *= 10
    assert find_stragglers(spiky) == []
    # ... a rank slow in bursts is not: a CPU quota spent, one step in four 3x as long
    bursts = _noisy(ranks, 40)
    bursts[0, ::4] *= 3
    assert [r for r, _ in find_stragglers(bursts)] == [0]
    times = _noisy(ranks, 60, slow=1, factor=2.0, from_step=25)
    watch = _FakeWatch(times, window=10)
    with caplog.at_level("WARNING", logger="gradsync.observe"):
        for step in range(60):
            watch.step({"step": step + 1, "step_time_s": times[0, step].item() + 0.5,
                        "comm_wait_s": 0.5 * (step + 1)})
            if step + 1 == 45:  # 20 steps after it slowed down
                assert "straggler: worker 1 computed" in caplog.text, caplog.text
    assert "steps 1-10" not in caplog.text and "steps 11-20" not in caplog.text
    assert len([r for r in caplog.records if "straggler" in r.message]) == 1  # named once


# --- a run of gradsync train ---------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 workers, 2 buckets or more, 12 steps: the timeline, metrics, summary and the
    TensorBoard directory."""
    root = tmp_path_factory.mktemp("timeline")
    trace = root / "trace.json"
    proc = gradsync("train", "--workers", "2", "--steps", "12", "--bucket-cap-mb", "0.03",
                    "--no-progress", "--timeline", str(trace), "--out", str(root / "out"),
                    "--tensorboard", str(root / "runs"))
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(line) for line in (root / "out/metrics.jsonl").open()]
    return (load(trace), metrics, json.loads((root / "out/summary.json").read_text()),
            root / "runs")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_row_per_rank_whose_steps_account_for_the_step_time(run):
    events, metrics, _, _ = run
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1"}
    for pid in (0, 1):
        steps = steps_of(events, pid)
        assert sorted(steps) == list(range(1, 13))
        ratios = []
        for step, spans in steps.items():
            assert {"forward", "backward", "wait for communication", "optimizer step",
                    "step"} <= set(spans), (pid, step, spans)
            parts = sum(spans[k]["dur"] for k in ("forward", "backward", "optimizer step"))
            whole = spans["step"]["dur"]
            if pid == 0:  # the step span is the step time metrics.jsonl reports
                assert whole == pytest.approx(1e6 * metrics[step - 1]["step_time_s"], rel=1e-3)
            assert parts <= whole + 1
            wait, backward = spans["wait for communication"], spans["backward"]
            assert backward["ts"] <= wait["ts"] <= wait["ts"] + wait["dur"] \
                <= backward["ts"] + backward["dur"] + 1
            ratios.append(parts / whole)
        # The spans leave out zero_grad and the gaps between them; on 2 shared cores a
        # preemption can land in a gap, so one step in a few dozen falls to about 0.75.
        assert statistics.median(ratios) >= 0.8 and min(ratios) >= 0.5, (pid, ratios)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bucket_events_name_the_summarys_algorithms_on_aligned_clocks(run):
    events, _, summary, _ = run
    algorithms = summary["bucket_algorithms"]
    assert len(algorithms) >= 2
    spans = {(e["pid"], e["args"]["step"], e["args"]["bucket"]): e for e in events
             if e["name"] == "all-reduce"}
    assert len(spans) == 2 * 12 * len(algorithms)
    clock = {e["pid"]: e["args"] for e in events if e["name"] == "clock aligned"}
    assert clock[0]["offset_to_rank0_s"] == 0.0 and clock[1]["rounds"] == 5
    assert abs(clock[1]["offset_to_rank0_s"]) < 0.05  # one host: the true offset is 0
    slack = 1e6 * clock[1]["spread_s"] + 1000
    for (pid, step, bucket), e in spans.items():
        assert e["args"]["algorithm"] == algorithms[bucket]
        assert e["args"]["bytes"] > 0
        # A collective cannot finish on one rank before the other rank started it.
        other = spans[(1 - pid, step, bucket)]
        assert other["ts"] <= e["ts"] + e["dur"] + slack, (pid, step, bucket)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_killed_midway_leaves_rank_files_that_parse(tmp_path):
    trace = tmp_path / "trace.json"
    _, _, _, summary = run_and_kill(["--workers", "2", "--steps", "400", "--timeline",
                                     str(trace)], victim=1, out=tmp_path / "out")
    assert summary is None and not trace.exists()  # no merge: the run failed
    for rank in (0, 1):
        events = load(rank_path(trace, rank))
        assert sum(e["name"] == "step" for e in events) >= 4, rank


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tensorboard_has_the_runs_scalars(run):
    _, metrics, summary, runs = run
    got = _scalars(runs)
    assert {"train/loss", "train/lr", "perf/samples_per_s", "time/compute_s", "time/wait_s",
            "comm/bytes_per_step", "eval/accuracy", "eval/loss"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    assert [v for _, v in got["train/loss"]] == pytest.approx([m["loss"] for m in metrics])
    assert got["eval/accuracy"] == [(12, pytest.approx(summary["eval_accuracy"]))]
    for (_, c), (_, w), m in zip(got["time/compute_s"], got["time/wait_s"], metrics):
        assert c + w == pytest.approx(m["step_time_s"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_summary_has_every_workers_compute_and_wait(run):
    _, metrics, summary, _ = run
    compute, waited = summary["compute_s_per_worker"], summary["waited_for_s_per_worker"]
    assert len(compute) == len(waited) == 2 and isinstance(summary["stragglers"], list)
    total = sum(m["step_time_s"] for m in metrics)
    assert 0 < compute[0] <= total + 1e-6 and min(waited) >= 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_out_directory_has_the_plots_of_the_run(run, tmp_path):
    from gradsync.observe.plots import per_step_split, per_worker_split, read_run

    _, metrics, summary, runs = run
    out = runs.parent / "out"
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "step_time.png"}
    assert all((out / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in ("loss.png",
                                                                             "step_time.png"))
    records, read = read_run(out)
    compute, wait = per_step_split(records)
    assert [c + w for c, w in zip(compute, wait)] == pytest.approx(
        [m["step_time_s"] for m in metrics])
    split = per_worker_split(read)
    assert split["compute"] == summary["compute_s_per_worker"]
    for r in range(2):  # compute + waiting + other is the worker's loop time
        assert sum(split[k][r] for k in split) == pytest.approx(
            summary["wall_s_per_worker"][r], rel=1e-6)
    # A killed run's files (no summary.json, a last line cut short) still draw.
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in metrics[:5]) + '{"step": 6, "lo')
    assert [p.name for p in write_run_plots(tmp_path)] == ["loss.png", "step_time.png"]


def test_the_summary_counts_shared_memory_bytes_beside_the_network():
    from gradsync.allreduce.architecture import AllReduceArchitecture
    from gradsync.train.summary import _communicated

    s = {"bytes_per_step_per_worker": 0.0, "bucket_algorithms": ["shm"]}
    assert _communicated({**s, "shm_bytes_per_step_per_worker": 1_234_000}) == (
        "0.000 MB over the network + 1.234 MB through shared memory per step per worker")
    assert "went through shared memory" in _communicated(s)  # a comm that does not count them
    assert _communicated({"bytes_per_step_per_worker": None}) == "not measured (torch DDP)"
    assert hasattr(AllReduceArchitecture, "bytes_shm")


def test_bench_plots_use_a_log_axis_only_where_values_span_decades():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradsync.bench.report import log_scale_if_wide

    fig, ax = plt.subplots()
    assert not log_scale_if_wide(ax, [1, 2, 4]) and ax.get_xscale() == "linear"
    assert log_scale_if_wide(ax, [8, 1 << 20], "y", decades=2) and ax.get_yscale() == "log"
    assert not log_scale_if_wide(ax, [0.0, 5.0])  # one positive value: nothing to span
    plt.close(fig)
