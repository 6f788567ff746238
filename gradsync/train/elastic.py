"""Elastic training with a step function: lose a worker and go on with the survivors; take a
replacement in. The trainer's form of :class:`~gradsync.train.elastic_state.State` (which
holds the mechanism: membership, agreeing on the state, the data, the retry).

    loop = ElasticLoop(ElasticWorld.from_env(timeout_s=300), model, make_optimizer,
                       len(train_set), batch_size=32, initial_workers=4)
    loop.run(step_fn, epochs=5)        # step_fn(model, indices, weight) -> loss (float)

``step_fn`` runs forward and backward on ``model`` (the wrapped one) for the samples
``indices`` and scales its mean loss by ``weight`` (1 unless the shares of a step differ in
size); the loop zeroes the gradients and steps the optimizer around it. It is the training
function a script would decorate with ``gradsync.elastic.run``, written once here.
"""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from ..comm.elastic import ElasticWorld
from .elastic_state import State
from .elastic_sync import Change, Position

StepFn = Callable[[nn.Module, list[int], float], float]

__all__ = ["Change", "ElasticLoop", "Position", "StepFn"]


class ElasticLoop(State):
    """Elastic data-parallel training of ``model`` by a step function; the arguments are
    :class:`State`'s (``make_optimizer`` builds the optimizer from the parameters)."""

    def __init__(self, world: ElasticWorld, model: nn.Module, make_optimizer: Callable,
                 dataset_len: int, batch_size: int, initial_workers: int, *,
                 rescale: str = "batch", seed: int = 0, shuffle: bool = True,
                 allreduce: dict | None = None, check_every: int = 1) -> None:
        super().__init__(world, model, make_optimizer, dataset_len=dataset_len,
                         batch_size=batch_size, initial_workers=initial_workers,
                         rescale=rescale, seed=seed, shuffle=shuffle, check_every=check_every,
                         allreduce=allreduce)

    @property
    def wrapped(self) -> nn.Module:
        return self.model

    def run(self, step_fn: StepFn, *, steps: int | None = None, epochs: int | None = None,
            on_step: Callable[[dict], None] | None = None) -> Position:
        """Train until ``steps`` steps or ``epochs`` epochs are done; returns the position.

        Raises:
            ElasticStopped: fewer than the minimum number of workers are left.
            ElasticDone: a replacement that came after the run finished.
            CommError: a failure that is not a lost member (a timeout with every member
                alive), or no new generation formed within the timeout.
        """
        if steps is None and epochs is None:
            raise ValueError("give steps or epochs")
        return self.retry(lambda: _train(self, step_fn, steps, epochs, on_step))


def _train(state: ElasticLoop, step_fn: StepFn, steps, epochs, on_step) -> Position:
    """The training function: steps until ``steps`` steps or ``epochs`` epochs are done."""
    while not (state.step >= steps if steps is not None else state.epoch >= epochs):
        for indices, weight in state.batches(steps):
            epoch, t0 = state.epoch, time.perf_counter()
            state.optimizer.zero_grad(set_to_none=True)
            loss = step_fn(state.model, indices, weight)
            state.optimizer.step()  # the position advances here
            elapsed = time.perf_counter() - t0
            if on_step is not None:
                on_step({"step": state.step, "epoch": epoch, "loss": loss,
                         "step_time_s": elapsed, "generation": state.world.gen,
                         "workers": state.size, "time": time.time()})
    return state.position
