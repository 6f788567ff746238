"""Plots of a run, from what ``--out DIR`` already holds (metrics.jsonl and summary.json).

Written by rank 0 at the end of `gradsync train --out DIR` into ``DIR/plots/``:

    loss.png        the training loss per step (and its mean over 20 steps), with the
                    held-out accuracy and loss of the end of the run (the run evaluates once)
    step_time.png   left: rank 0's step split per step (compute, waiting on communication);
                    right: each worker's loop split into compute, waiting on
                    communication, and other (its loop's wall time outside the steps:
                    checkpoint writes, the metrics, the progress bar)

matplotlib (the ``plot`` extra) draws them with its Agg backend, no display needed; without
it the run logs one line and writes none. ``write_run_plots(DIR)`` redraws them from the files
of a finished (or killed) run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("gradsync.observe")
SMOOTH = 20  # steps in the loss's running mean (the summary's train loss uses 20 too)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(out: str | Path) -> tuple[list[dict], dict]:
    """metrics.jsonl's records (a last line cut short by a kill is skipped) and
    summary.json (empty when the run did not finish)."""
    out = Path(out)
    records = []
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() \
        else {}
    return records, summary


def per_step_split(records: list[dict]) -> tuple[list[float], list[float]]:
    """Rank 0's compute and waiting seconds per step (metrics.jsonl's ``comm_wait_s`` counts
    from the loop start; a step's own wait is the difference, at most its step time)."""
    compute, wait, before = [], [], 0.0
    for r in records:
        w = min(max(r.get("comm_wait_s", 0.0) - before, 0.0), r["step_time_s"])
        before = r.get("comm_wait_s", 0.0)
        compute.append(r["step_time_s"] - w)
        wait.append(w)
    return compute, wait


def per_worker_split(summary: dict) -> dict[str, list[float]] | None:
    """Each worker's run in seconds: compute, waiting on communication, other (the wall
    time outside its steps); None when the summary lacks the per-worker figures
    (``--straggler-window 0``, a Parameter Server run)."""
    compute, steps = summary.get("compute_s_per_worker"), summary.get("step_s_per_worker")
    if not compute or not steps:
        return None
    walls = summary.get("wall_s_per_worker") or [summary.get("wall_s", 0.0)] * len(steps)
    return {"compute": compute,
            "waiting on communication": [max(s - c, 0.0) for s, c in zip(steps, compute)],
            "other": [max(w - s, 0.0) for w, s in zip(walls, steps)]}


def write_run_plots(out: str | Path) -> list[Path]:
    """Draw ``out``/plots/loss.png and step_time.png; returns the files written (none
    without matplotlib or without steps)."""
    plt = _pyplot()
    records, summary = read_run(out)
    if plt is None:
        log.warning("no plots under %s: matplotlib is missing (pip install 'gradsync[plot]')",
                    out)
        return []
    if not records:
        return []
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = [_loss_plot(plt, records, summary, folder / "loss.png"),
               _time_plot(plt, records, summary, folder / "step_time.png")]
    log.info("plots of the run: %s", ", ".join(str(p) for p in written))
    return written


def _loss_plot(plt, records: list[dict], summary: dict, path: Path) -> Path:
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    windows = [losses[max(0, i - SMOOTH + 1):i + 1] for i in range(len(losses))]
    mean = [sum(w) / len(w) for w in windows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, losses, lw=0.8, alpha=0.5, label="train loss (rank 0's batch)")
    left.plot(steps, mean, lw=1.6, label=f"mean of the last {SMOOTH} steps")
    if "eval_loss" in summary:
        left.plot([summary.get("steps", steps[-1])], [summary["eval_loss"]], "k*", ms=10,
                  label=f"held-out loss {summary['eval_loss']:.4f}")
    left.set(xlabel="step", ylabel="loss", title="loss")
    if min(losses) > 0 and max(losses) / min(losses) > 100:
        left.set_yscale("log")  # losses that fall by decades
    right.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02),
              xlim=(0, steps[-1] * 1.05), title="accuracy (evaluated at the end of the run)")
    if "eval_accuracy" in summary:
        right.plot([summary.get("steps", steps[-1])], [summary["eval_accuracy"]], "o", ms=8,
                   label=f"{100 * summary['eval_accuracy']:.2f} % at step "
                         f"{summary.get('steps', steps[-1])}")
        right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle(_title(summary), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _time_plot(plt, records: list[dict], summary: dict, path: Path) -> Path:
    steps = [r["step"] for r in records]
    compute, wait = per_step_split(records)
    workers = per_worker_split(summary)
    fig, axes = plt.subplots(1, 2 if workers else 1, figsize=(10 if workers else 6, 3.8),
                             squeeze=False)
    left = axes[0][0]
    left.stackplot(steps, [1e3 * c for c in compute], [1e3 * w for w in wait],
                   labels=["compute", "waiting on communication"], alpha=0.8)
    left.set(xlabel="step", ylabel="ms", title="rank 0: each step's time")
    whole = sorted(c + w for c, w in zip(compute, wait))
    typical = whole[int(0.95 * (len(whole) - 1))]  # the first steps can be 100x the others
    if whole[-1] > 3 * typical > 0:
        left.set_ylim(0, 2 * 1e3 * typical)
        left.set_title("rank 0: each step's time (slowest steps cut off)")
    left.legend(fontsize="small", loc="upper right")
    left.grid(alpha=0.3)
    if workers:
        right, bottom = axes[0][1], [0.0] * len(workers["compute"])
        ranks = list(range(len(bottom)))
        for part, seconds in workers.items():
            right.bar(ranks, seconds, bottom=bottom, label=part)
            bottom = [b + s for b, s in zip(bottom, seconds)]
        named = {x["worker"] for x in summary.get("stragglers", [])}
        right.set_xticks(ranks, [f"{r}{' (straggler)' if r in named else ''}" for r in ranks])
        right.set(xlabel="worker", ylabel="seconds", title="each worker's run",
                  ylim=(0, 1.3 * max(bottom)))
        right.legend(fontsize="small", loc="upper center", ncol=3)
        right.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(summary), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _title(summary: dict) -> str:
    if not summary:
        return "an unfinished run (no summary.json)"
    return (f"{summary.get('workload', '?')} on {summary.get('workers', '?')} workers, "
            f"arch {summary.get('arch', '?')}, {summary.get('steps', '?')} steps")


def draw_timeline(trace: str | Path, png: str | Path, steps: tuple[int, int] = (5, 6)) -> Path:
    """A picture of a ``--timeline`` file: one band per rank, its compute row and its buckets'
    rows, for the spans of ``steps`` (first, last); what Perfetto shows, as a PNG (the
    README's screenshot). Raises ImportError without matplotlib."""
    plt = _pyplot()
    if plt is None:
        raise ImportError("drawing a timeline needs matplotlib (pip install 'gradsync[plot]')")
    events = json.loads(Path(trace).read_text(encoding="utf-8"))
    spans = [e for e in events if e.get("ph") == "X"
             and steps[0] <= e.get("args", {}).get("step", -1) <= steps[1]]
    rows = sorted({(e["pid"], e["tid"]) for e in spans})
    where = {row: i for i, row in enumerate(rows)}
    t0 = min(e["ts"] for e in spans)
    colours = {"step": "#dddddd", "forward": "#4c72b0", "backward": "#55a868",
               "wait for communication": "#c44e52", "optimizer step": "#8172b2",
               "checkpoint write": "#937860", "comm hook (compress)": "#da8bc3"}
    inside = ("wait for communication", "comm hook (compress)")  # within backward
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.4))
    for e in spans:
        y = where[(e["pid"], e["tid"])]
        nested = e["name"] in inside  # inside backward: drawn thinner
        ax.barh(-y, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.45 if nested else 0.8,
                color=colours.get(e["name"], "#dd8452"), edgecolor="none",
                zorder=1 if e["name"] == "step" else 3 if nested else 2)  # step underneath
    ax.set_yticks([-i for i in range(len(rows))],
                  [f"rank {p} " + ("compute" if t == 0 else f"bucket {t - 100}" if t < 200
                                   else f"server {t - 200}") for p, t in rows], fontsize=7)
    ax.set_xlabel("ms")
    names = [n for n in colours if any(e["name"] == n for e in spans)] + ["all-reduce (bucket)"]
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours.get(n, "#dd8452"))
                       for n in names], labels=names, fontsize=7, ncol=len(names),
              loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return Path(png)
