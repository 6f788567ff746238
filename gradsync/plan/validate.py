"""`gradsync plan --validate`: run the ranked configurations and set the measured step time
beside the predicted one.

Each configuration is one `gradsync train` of the profiled workload and batch, for
``steps`` steps, on this machine (one host) or in a lab of the plan's hosts and ranks per
host (root; `gradsync train --lab N --procs-per-host P`); the measured figure is the
summary's median step time, which leaves out start-up and the first steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .cluster import Cluster
from .predict import Prediction
from .profile import Profile
from .report import lab_flags, workload_flags


def train_argv(profile: Profile, cluster: Cluster, pred: Prediction, steps: int,
               rates: list[str] | None) -> list[str]:
    """The `gradsync train` arguments that run ``pred``'s configuration on ``cluster``."""
    cand = pred.candidate
    argv = [*workload_flags(profile), *cand.flags(), "--steps", str(steps), "--no-progress"]
    if cluster.hosts == 1:
        return argv + ["--workers", str(pred.workers)]
    return argv + lab_flags(cluster, ",".join(rates or []))


def measure(argv: list[str], timeout_s: float = 600) -> float | None:
    """The median step time of one `gradsync train ARGV` in seconds; None if it failed."""
    with tempfile.TemporaryDirectory(prefix="gradsync-plan-") as out:
        run = subprocess.run([sys.executable, "-m", "gradsync", "train", *argv, "--out", out],
                             capture_output=True, text=True, timeout=timeout_s)
        summary = Path(out) / "summary.json"
        if run.returncode != 0 or not summary.exists():
            tail = run.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"  (failed: {tail[0]})", file=sys.stderr, flush=True)
            return None
        return json.loads(summary.read_text())["step_time_ms_median"] / 1e3


def validate(profile: Profile, cluster: Cluster, preds: list[Prediction], top: int,
             steps: int, rates: list[str] | None) -> list[dict]:
    """Run the first ``top`` predictions; one row per run, printed as it ends."""
    rows = []
    print(f"{'configuration':28} {'predicted ms':>12} {'measured ms':>12} {'error':>7}",
          flush=True)
    for pred in preds[:top]:
        measured = measure(train_argv(profile, cluster, pred, steps, rates))
        error = None if measured is None else (pred.step_s - measured) / measured
        rows.append({"configuration": pred.candidate.label, "flags": pred.candidate.flags(),
                     "predicted_s": pred.step_s, "measured_s": measured, "error": error,
                     "workers": pred.workers})
        shown = "failed" if measured is None else f"{1e3 * measured:12.2f} {100 * error:+6.1f}%"
        print(f"{pred.candidate.label:28} {1e3 * pred.step_s:12.2f} {shown}", flush=True)
    done = [r for r in rows if r["measured_s"] is not None]
    if done:
        best = min(done, key=lambda r: r["measured_s"] / r["workers"])
        within = sum(abs(r["error"]) <= 0.10 for r in done)
        print(f"within 10 %: {within} of {len(done)}; fastest measured (per sample): "
              f"{best['configuration']}; ranked first: {rows[0]['configuration']}", flush=True)
    return rows
