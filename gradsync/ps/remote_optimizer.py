"""The optimizer a Parameter-Server worker trains with: the update happens on the servers.

``step()`` waits for every server's reply to the step's pushes and writes the parameters into
the model (:meth:`PSWorker.step`); ``zero_grad()`` clears the gradients the next backward
pushes. It holds no state: the servers' optimizers do, in their checkpoint files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import PSWorker


class RemoteOptimizer:
    """The optimizer a PS worker trains with: ``step()`` pulls what the servers computed."""

    def __init__(self, worker: PSWorker):
        self.worker = worker

    def state_dict(self) -> dict:
        return {}  # the optimizer state lives on the servers, in their checkpoint files

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise ValueError("a parameter-server worker holds no optimizer state; the "
                             "servers restore theirs")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.worker._params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        self.worker.step()
