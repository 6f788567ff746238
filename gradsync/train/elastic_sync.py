"""The pieces of elastic training around the state (elastic_state.py): a worker's share of a
step, the interruption at a step boundary, the position in the data, a membership change as
logged, agreeing on the state in a new generation, and the fault injection of tests and
benchmarks."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import comm

# Fault injection for tests and benchmarks: "UID@STEP" makes member UID SIGKILL itself when
# it is about to start step STEP (once: a replacement has another uid). "STEP" in AWAIT_ENV
# makes the members wait at step STEP until the membership changes (a replacement is ready),
# so that a short run still sees the join.
KILL_ENV, AWAIT_ENV = "GRADSYNC_ELASTIC_KILL", "GRADSYNC_ELASTIC_AWAIT"


class Share(NamedTuple):
    """This worker's part of one step: the sample indices, and the factor for its mean loss
    (``workers * len(indices) / samples of the step``; 1 unless the shares differ in size,
    0 for a worker left without a sample at an epoch's end)."""

    indices: list[int]
    weight: float


class MembershipChanged(Exception):
    """Raised at a step boundary when a newer generation exists (a replacement is ready);
    :func:`run` forms it and calls the training function again (Horovod's
    HostsUpdatedInterrupt)."""


@dataclass
class Change:
    """One membership change, as logged and counted in the summary."""

    generation: int
    left: list[int]
    joined: list[int]
    step: int            # the step the new membership starts with
    workers: int
    recover_s: float = float("nan")  # from noticing the change to its first completed step

    def describe(self) -> str:
        who = "; ".join([f"member{'s' * (len(self.left) > 1)} {_ids(self.left)} left"] * bool(
            self.left) + [f"member{'s' * (len(self.joined) > 1)} {_ids(self.joined)} joined"]
            * bool(self.joined)) or "same members"
        return (f"elastic: generation {self.generation}: {who} at step {self.step}; "
                f"{self.workers} workers; recovered in {self.recover_s:.2f} s")


def _ids(uids: list[int]) -> str:
    return ", ".join(str(u) for u in uids)


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    offset: int = 0   # samples of this epoch's order consumed


def agree_state(group: comm.Group, position: Position, model: nn.Module,
                optimizer: torch.optim.Optimizer, values: dict[str, float]
                ) -> tuple[Position, dict[str, float]]:
    """Collective: every member takes the position, model and optimizer state and the
    ``values`` of the member that completed the most steps (the first such, by group rank);
    returns that position and those values."""
    steps = torch.zeros(group.size, dtype=torch.int64)
    steps[group.rank] = position.step + 1  # a replacement has step -1
    comm.all_reduce(steps, op="sum", group=group, algorithm="native")
    src = int(torch.argmax(steps))
    values = _broadcast_values(values, src, group)
    if int(steps.min()) == int(steps.max()):
        return position, values  # every member is at the same step with the same state
    header = torch.tensor([position.step, position.epoch, position.offset], dtype=torch.int64)
    comm.broadcast(header, src=src, group=group, algorithm="native")
    position = Position(*(int(v) for v in header))
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    if position.step > 0:
        _materialize(optimizer)
        tensors += [v for p in model.parameters()
                    for _, v in sorted(optimizer.state[p].items())
                    if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        for t in tensors:
            comm.broadcast(t, src=src, group=group, algorithm="native")
    return position, values


def _broadcast_values(values: dict[str, float], src: int, group: comm.Group
                      ) -> dict[str, float]:
    """``values`` of group rank ``src`` (numbers as float64: integers up to 2**53 exact);
    every member has the same names, since every member runs the same script."""
    if not values:
        return values
    names = sorted(values)
    flat = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)  # (len(names),)
    comm.broadcast(flat, src=src, group=group, algorithm="native")
    return {k: type(values[k])(v) for k, v in zip(names, flat.tolist())}


def drop_frames(exc: BaseException | None) -> None:
    """Clear the tracebacks of ``exc`` and of the exceptions behind it."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _materialize(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that never stepped its state tensors (zero gradients, one step:
    SGD-momentum and Adam leave the parameters as they are), so that every member holds the
    same state layout before the broadcast overwrites it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def kill_step(uid: int) -> int | None:
    """The step at which member ``uid`` kills itself (KILL_ENV), or None."""
    raw = os.environ.get(KILL_ENV, "")
    for item in filter(None, raw.split(",")):
        who, _, step = item.partition("@")
        if who.strip() == str(uid):
            return int(step)
    return None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
