"""Fault-injection trials of `gradsync train`: SIGKILL the whole job at random moments while it
saves a checkpoint every step, resume, repeat; then finish and compare with an uninterrupted
run.

    python -m benchmarks.trial_kill_resume                       # sync PS, 2 servers, 2 workers
    python -m benchmarks.trial_kill_resume --arch allreduce --workers 2

Each trial starts `gradsync train --resume`, waits until that run has committed a checkpoint
of its own, sleeps a random 0 to 1.5 s and SIGKILLs the launcher and every rank at once. After
each kill the newest committed checkpoint must verify (every file's sha256) and must not be
older than the one before the trial. At the end one more run resumes and stops at a fixed
step; its parameters (float64) must equal, bitwise, those of a run that was never killed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradsync.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parent.parent


def gradsync_train(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "gradsync", "train", "--dtype", "float64", "--no-progress",
            *args]


def kill_once(args: list[str], ck: Path, rng: random.Random) -> tuple[int | None, float]:
    """Start a resuming run, kill it at a random moment; returns (newest step, delay)."""
    mgr = CheckpointManager(ck)
    before = mgr.latest()
    proc = subprocess.Popen(gradsync_train([*args, "--steps", "1000000", "--resume"]),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while (mgr.latest() or -1) <= (before or -1):  # this run has committed one of its own
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the run ended (code {proc.returncode}) before its first save")
        time.sleep(0.02)
    delay = rng.uniform(0.0, 1.5)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    found = mgr.load_latest_valid()  # verifies every file of the newest intact checkpoint
    newest = None if found is None else found[0]
    if newest is None or newest != mgr.latest() or (before is not None and newest < before):
        raise SystemExit(f"after the kill: newest valid {newest}, latest {mgr.latest()}, "
                         f"before {before}")
    return newest, delay


def final_state(ck: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``step``: the model, the optimizer state, and each server's
    shard and optimizer state."""
    directory = ck / f"step-{step:08d}"
    replicated = torch.load(directory / "state.pt")
    out = dict(replicated["model"])
    out.update(_optimizer_tensors("optimizer", replicated["optimizer"]))
    for path in sorted(directory.glob("rank-*.pt")):
        state = torch.load(path).get("state")
        if state is not None:  # a parameter server's
            out[f"{path.stem}.shard"] = state["shard"]
            out.update(_optimizer_tensors(path.stem, state["optimizer"]))
    return out


def _optimizer_tensors(prefix: str, state_dict: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{i}.{name}": t
            for i, buf in state_dict.get("state", {}).items()
            for name, t in buf.items() if isinstance(t, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ps")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--extra-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    common = ["--arch", args.arch, "--workers", str(args.workers)]
    if args.arch == "ps":
        common += ["--servers", str(args.servers)]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="gradsync-kill-") as tmp:
        ck, straight = Path(tmp) / "killed", Path(tmp) / "straight"
        every = [*common, "--checkpoint-every", "1", "--keep", "2"]
        steps = []
        for trial in range(args.trials):
            step, delay = kill_once([*every, "--checkpoint-dir", str(ck)], ck, rng)
            steps.append(step)
            print(f"trial {trial + 1}: killed {delay:.2f} s after its first save; newest "
                  f"committed checkpoint step {step} verifies", flush=True)
        end = steps[-1] + args.extra_steps
        for directory, resume in ((ck, ["--resume"]), (straight, [])):
            subprocess.run(gradsync_train([*common, "--steps", str(end), "--checkpoint-every",
                                           str(end), "--checkpoint-dir", str(directory),
                                           *resume]),
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        a, b = final_state(ck, end), final_state(straight, end)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{args.trials}/{args.trials} kills left a verified newest checkpoint; the run "
              f"then finished at step {end}: {len(a)} tensors (model, shards, optimizer "
              f"state) {'bitwise equal to' if equal else 'DIFFERENT from'} an uninterrupted "
              f"run", flush=True)
        if not equal:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
