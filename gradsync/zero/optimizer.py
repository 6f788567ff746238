"""The shard optimizer: an ordinary torch optimizer over this rank's pieces, then the
parameters' all-gather (launched; the next forward waits for it, regather.py).

The inner optimizer sees one leaf per bucket, ``bucket.piece`` (<= k,), which shares its
storage with the bucket's flat parameters, so stepping it updates the model in place and its
state (Adam's exp_avg, exp_avg_sq) exists only for this rank's 1/N of the elements. Each
piece's ``.grad`` is set by ShardedDataParallel at the end of backward. Element-wise
optimizers (SGD, Adam, AdamW, ...) give the same values as on whole parameters; ones that
look at a whole tensor (LAMB's trust ratio, per-tensor gradient clipping) would not.
"""

from __future__ import annotations

import torch

from .. import comm
from .layout import ShardedBucket
from .regather import RegatherAfterStep


class ShardedOptimizer:
    """``optimizer_class(**defaults)`` over this rank's pieces; :meth:`step` then
    all-gathers every bucket so that each rank holds the whole updated model again (in the
    background: :meth:`wait_for_parameters`).

    Raises:
        ValueError: this rank owns no element (fewer elements than ranks).
    """

    def __init__(self, buckets: list[ShardedBucket], group: comm.Group, optimizer_class,
                 **defaults):
        self.buckets, self.group = buckets, group
        pieces = [b.piece for b in buckets if b.piece is not None]
        if not pieces:
            raise ValueError(f"rank {group.rank} owns no parameter element: the model "
                             f"has fewer elements than the {group.size} ranks")
        self.optimizer: torch.optim.Optimizer = optimizer_class(pieces, **defaults)
        # ShardedDataParallel sets it for stages 1-2 (stage 3 gathers per layer before use).
        self.regather: RegatherAfterStep | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        """Step this rank's pieces, then launch the parameters' all-gather (collective;
        stages 1-2), which the next forward waits for layer by layer (regather.py)."""
        self.wait_for_parameters()  # a step with no forward since the last one
        loss = self.optimizer.step(closure)
        if self.regather is not None:
            self.regather.start()
        return loss

    def wait_for_parameters(self) -> None:
        """Wait for the all-gathers of the last :meth:`step` (every rank's pieces in every
        rank's flat buckets). Stages 1-2; nothing to wait for in stage 3."""
        if self.regather is not None:
            self.regather.wait()

    def gather_parameters(self) -> None:
        """Every rank's pieces into every rank's flat buckets, here and now (collective;
        stages 1-2)."""
        if self.regather is not None:
            self.regather.start()
            self.regather.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the pieces' gradients and the full-size ones of the wrapped module."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for b in self.buckets:
            for p in b.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (pieces in bucket order)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
