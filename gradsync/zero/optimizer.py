"""The shard optimizer: an ordinary torch optimizer over this rank's pieces, then the
parameters' all-gather.

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


class ShardedOptimizer:
    """``optimizer_class(**defaults)`` over this rank's pieces; :meth:`step` then
    all-gathers every bucket so that each rank holds the whole updated model again.

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
        # Stage 3 sets False: its parameters are gathered per layer before each use.
        self.gather_after_step = True
        self.gather_algorithm = "auto"  # ShardedDataParallel's shard_algorithm

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        """Step this rank's pieces, then all-gather the parameters (collective; stages 1-2)."""
        loss = self.optimizer.step(closure)
        if self.gather_after_step:
            self.gather_parameters()
        return loss

    def gather_parameters(self) -> None:
        """Every rank's pieces into every rank's flat buckets: one all-gather per bucket,
        all started before the first wait."""
        works = []
        for b in self.buckets:
            # (k,) input: this rank's piece with its padding, which is also the output
            # list's entry ``rank``: every engine and algorithm stages the input into a
            # (N * k,) buffer before writing the outputs, so the aliasing is safe and saves
            # a copy of the piece.
            pieces = b.pieces(b.flat)
            works.append(comm.all_gather_async(pieces, pieces[b.rank], group=self.group,
                                               algorithm=self.gather_algorithm))
        for work in works:
            work.wait()

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
