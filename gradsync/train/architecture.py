"""What the trainer asks of an architecture, and the registry that maps ``--arch`` to one.

The trainer never learns which architecture runs it: it hands over the model and a way to
build the optimizer, then trains what it gets back. All-Reduce wraps the model so that
backward averages gradients; the Parameter Server will move the optimizer to its servers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .. import comm
from .config import TrainConfig

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Architecture(Protocol):
    name: str

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Return the model to train and the optimizer whose ``step()`` updates it."""

    def comm_wait_s(self) -> float:
        """Seconds spent waiting on communication that did not overlap computation."""


class AllReduceArchitecture:
    """Every process is a worker; gradients are averaged by :class:`gradsync.DataParallel`."""

    name = "allreduce"

    def __init__(self, config: TrainConfig, group: comm.Group):
        self.config = config
        self.group = group
        self.model = None

    def prepare(self, model, make_optimizer):
        from ..allreduce import DataParallel

        self.model = DataParallel(model, group=self.group, algorithm=self.config.algorithm,
                                  bucket_cap_mb=self.config.bucket_cap_mb)
        return self.model, make_optimizer(self.model.parameters())

    def comm_wait_s(self) -> float:
        return self.model.stats.comm_wait_s if self.model is not None else 0.0


def build_architecture(config: TrainConfig, group: comm.Group) -> Architecture:
    if config.arch == "allreduce":
        return AllReduceArchitecture(config, group)
    raise ValueError(f"unknown architecture {config.arch!r}")
