"""An elastic script for jobs across hosts (tests/test_elastic_hosts.py,
benchmarks/bench_elastic_hosts.py): tests/_elastic_worker.py's MLP and data, trained for
EPOCHS epochs with gradsync.elastic, that records when each step completes.

    gradsync run --elastic --rdzv-endpoint HOST:PORT --nproc-per-node 2 \\
        tests/scripts/elastic_hosts.py OUT EPOCHS [PAUSE_S [JOINER]]

Every worker appends "STEP TIME SIZE" to OUT/steps-UID after each step it completes (TIME
from time.time(): the lab's hosts share this machine's clock; SIZE: the workers then) and writes OUT/result-UID.json at
the end (the members, the changes, the parameters' sum, the accuracy on the data). PAUSE_S (default 0) is slept after
each step, so that a run lasts long enough for a host to join. JOINER (default: none), a member
id: once a generation holds a member with that id or a later one (a host that joined), the
run ends with the epoch in progress instead of after EPOCHS (a test's run need not last
EPOCHS x PAUSE_S once the join it waits for has happened).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tests._elastic_worker import N, build, make_optimizer


def main(out: Path, epochs: int, pause_s: float = 0.0, joiner: int = -1) -> None:
    import gradsync.elastic

    torch.set_num_threads(1)
    world = gradsync.elastic.init()
    model, x, y = build()
    state = gradsync.elastic.State(world, model, make_optimizer, dataset_len=N, batch_size=4)
    steps = open(out / f"steps-{world.uid}", "a", buffering=1)

    @gradsync.elastic.run
    def train(state):
        # (called again after each change) Every member of a generation has the same members
        # and, once the state is agreed, the same epoch: they all end at the same step.
        last = epochs
        if joiner >= 0 and max(world.members) >= joiner:
            last = min(epochs, state.epoch + 1)
        for _ in range(state.epoch, last):
            for indices, weight in state.batches():
                state.optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(state.model(x[indices]), y[indices])
                (loss * weight).backward()
                state.optimizer.step()
                state.commit()
                steps.write(f"{state.step} {time.time():.6f} {state.size}\n")
                time.sleep(pause_s)

    train(state)
    result = {"members": list(world.members), "step": state.step,
              "changes": [vars(c) for c in state.changes],
              "param_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
              "accuracy": float((model(x).argmax(1) == y).double().mean())}
    (out / f"result-{world.uid}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0,
         int(sys.argv[4]) if len(sys.argv) > 4 else -1)
