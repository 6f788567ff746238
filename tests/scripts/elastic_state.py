"""An elastic training script written the way a user writes one (gradsync.elastic: State and
the run decorator), for tests/test_elastic_script.py: a small float64 MLP on random data,
SGD with momentum, two epochs.

    python -c 'import sys; from gradsync.train.elastic_run import launch; sys.exit(launch(
        [sys.executable, "tests/scripts/elastic_state.py", "OUT"], 3, min_workers=2))'

Every worker writes OUT/pid-UID at start and, once trained, OUT/result-UID.json: the
parameters, the value ``commits`` kept with the state, the position, the members and the
membership changes. The model, data and optimizer are tests/_elastic_worker.py's, which the
test's one-process oracle builds too (run from the repository root, or with it on
PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tests._elastic_worker import N, build, make_optimizer  # the model, data and SGD

BATCH, WORKERS, EPOCHS = 4, 3, 2


def main(out: Path) -> None:
    import gradsync.elastic

    torch.set_num_threads(1)
    world = gradsync.elastic.init()
    (out / f"pid-{world.uid}").write_text(str(os.getpid()))
    model, x, y = build()
    state = gradsync.elastic.State(world, model, make_optimizer, dataset_len=N,
                                   batch_size=BATCH, commits=0)

    @gradsync.elastic.run
    def train(state):
        for _ in range(state.epoch, EPOCHS):
            for indices, weight in state.batches():
                state.optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(state.model(x[indices]), y[indices])
                (loss * weight).backward()
                state.optimizer.step()
                state.commits += 1
                state.commit()

    train(state)
    result = {"params": [p.detach().tolist() for p in model.parameters()],
              "commits": state.commits, "step": state.step, "epoch": state.epoch,
              "members": list(world.members), "changes": [vars(c) for c in state.changes]}
    tmp = out / f"result-{world.uid}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(out / f"result-{world.uid}.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
