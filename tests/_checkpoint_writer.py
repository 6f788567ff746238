"""Victim process of the kill trials in test_checkpoint.py: saves checkpoints until killed.

It runs as a small fork server, because importing torch costs about 3 s here and 30 trials
would spend most of the test's time on imports. The server imports torch once, then reads
commands on stdin, one per line::

    run DIRECTORY FIRST_STEP COUNT

For each it forks a child, which prints ``child PID``, builds the model of `make_model`, and
for each step FIRST_STEP .. FIRST_STEP + COUNT - 1 fills every parameter with the step
number and saves it through `CheckpointManager(DIRECTORY, keep=KEEP)`, printing
``begin STEP`` before and ``end STEP SECONDS`` after each save. The test SIGKILLs the child
at a random moment; the server reaps it and prints ``exit PID STATUS``. A line ``quit``
(or end of input) stops the server.

Run by hand: ``echo "run /tmp/ck 1 3" | python tests/_checkpoint_writer.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from gradsync.checkpoint import (  # noqa: E402
    CheckpointManager,
    CheckpointMeta,
    capture_rng_state,
    model_fingerprint,
)

KEEP = 2


def make_model() -> torch.nn.Module:
    """A 7.0 MiB float32 model (1,836,800 parameters), so a save takes measurable time."""
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 768))


def meta_for(model: torch.nn.Module, step: int) -> CheckpointMeta:
    return CheckpointMeta(step=step, epoch=0, workload="kill-trial", world_size=1,
                          arch="allreduce", param_fingerprint=model_fingerprint(model))


def _child(directory: str, first: int, count: int) -> None:
    torch.set_num_threads(1)  # two cores here; the test process needs one to read and kill
    print(f"child {os.getpid()}", flush=True)
    model = make_model()
    manager = CheckpointManager(directory, keep=KEEP)
    for step in range(first, first + count):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        print(f"begin {step}", flush=True)
        start = time.perf_counter()
        manager.save(step, {"model": model.state_dict(), "step": step},
                     meta_for(model, step), per_rank=capture_rng_state())
        print(f"end {step} {time.perf_counter() - start:.6f}", flush=True)


def main() -> None:
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        directory, first, count = words[1], int(words[2]), int(words[3])
        sys.stdout.flush()  # nothing buffered may be duplicated into the child
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(directory, first, count)
            except BaseException as exc:  # report, then leave without the server's cleanup
                print(f"error {type(exc).__name__}: {exc}", flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    main()
