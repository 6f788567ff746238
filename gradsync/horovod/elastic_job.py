"""The elastic job hvd.init() joins under `gradsync run --elastic` (apart from elastic.py,
which needs the optimizer: basics imports this one)."""

from __future__ import annotations

import os

import torch

from .. import elastic as gradsync_elastic
from ..exits import EXIT_AGREED


# Horovod's API is global (hvd.elastic.TorchState(model, optimizer) names no job): the one
# ElasticWorld hvd.init() joined lives here, in a one-element list.
JOB: list = []


def join_job() -> None:
    """hvd.init() under `gradsync run --elastic`: join the job and its first generation now,
    so that hvd.size() and hvd.rank() answer before the training function runs."""
    world = gradsync_elastic.init()
    # A first optimizer built while a group exists keeps it referenced (State's comment):
    # build one before any group forms.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if world.uid >= int(os.environ.get("WORLD_SIZE", "0")):
        world.announce_ready()  # a replacement: ask for a place in the next generation
    try:
        world.form()
    except gradsync_elastic.ElasticStopped:
        raise SystemExit(EXIT_AGREED) from None  # fewer workers than the minimum
    except gradsync_elastic.ElasticDone:
        raise SystemExit(0) from None
    JOB[:] = [world]
