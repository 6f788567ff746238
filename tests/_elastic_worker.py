"""An elastic worker written against the Python API (gradsync.train.elastic.ElasticLoop),
for tests/test_elastic.py: a small float64 MLP on random data, SGD with momentum.

    python -m tests._elastic_worker OUT STEPS RESCALE

The worker that is the group's rank 0 at the end writes OUT/result.json: the parameters,
the membership changes and the final member count. ``build`` is shared with the test's
one-process oracle.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

N, FEATURES, CLASSES = 107, 6, 3
BATCH, WORKERS, LR = 5, 4, 0.1


def build(seed: int = 0):
    """The model (float64) and the data, the same in every process."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, CLASSES)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return model, x, y


def make_optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def main(out: str, steps: int, rescale: str) -> int:
    from gradsync.comm.elastic import ElasticWorld
    from gradsync.train.elastic import ElasticLoop

    torch.set_num_threads(1)
    model, x, y = build()
    world = ElasticWorld.from_env(timeout_s=float(os.environ.get("TEST_COMM_TIMEOUT", "60")))
    loop = ElasticLoop(world, model, make_optimizer, N, BATCH, WORKERS, rescale=rescale)

    def step_fn(m, indices, weight):
        loss = torch.nn.functional.cross_entropy(m(x[indices]), y[indices])
        (loss * weight).backward()
        return loss.item()

    loop.run(step_fn, steps=steps)
    if loop.group.rank == 0:
        result = {"params": [p.detach().tolist() for p in model.parameters()],
                  "workers": loop.group.size, "generation": world.gen,
                  "changes": [vars(c) for c in loop.changes], "step": loop.position.step}
        tmp = Path(out) / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(Path(out) / "result.json")
    world.abandon()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    os._exit(code)  # no interpreter finalization with engine threads about (see cli.py)
