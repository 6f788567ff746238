"""The Parameter Server's wire format: a fixed-layout int64 header, then at most one tensor.

Nothing else crosses the network, and nothing is unpickled. Every message from a worker to a
server, and every reply, is

    header: int64[8] = [MAGIC, kind, step, shard, numel, version, sender, status]
    payload: numel elements of the shard's dtype (PUSH: gradients, PARAMS: parameters);
             CHECKPOINT, SAVED and DONE have none

on tag 0 of the pair, so the two parts of a message arrive in order. A server validates every
header (magic, kind, shard, size, step) before it reads the payload and answers a bad one with
an ERROR reply whose ``status`` says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

MAGIC = 0x6753_5053  # "gSPS"
HEADER_LEN = 8
TAG = 0


class Kind(IntEnum):
    PUSH = 1      # worker -> server: gradient of one shard for one step
    PARAMS = 2    # server -> worker: fresh parameters of one shard
    DONE = 3      # worker -> server: no more pushes from this worker
    ERROR = 4     # server -> worker: the last message was rejected (payload: zeros)
    STATS = 5     # server -> worker, at the end: ServerStats as float64
    CHECKPOINT = 6  # worker -> server: at step ``step``, save your shard once all workers ask
    SAVED = 7     # server -> worker: the shard of that step is on disk (status: complete?)


class Status(IntEnum):
    OK = 0
    BAD_MAGIC = 1
    BAD_KIND = 2
    WRONG_SHARD = 3
    WRONG_SIZE = 4
    STEP_OUT_OF_RANGE = 5
    INCOMPLETE = 6  # SAVED, but a dropped worker's state is missing from the checkpoint


STATUS_TEXT = {
    Status.BAD_MAGIC: "the header's magic number is wrong",
    Status.BAD_KIND: "unknown message kind",
    Status.WRONG_SHARD: "the message names a shard this server does not hold",
    Status.WRONG_SIZE: "the payload size does not match the shard",
    Status.STEP_OUT_OF_RANGE: "the step is out of range",
    Status.INCOMPLETE: "a worker was dropped, so the checkpoint lacks its state",
}


class PSProtocolError(RuntimeError):
    """A server rejected a message, or a reply made no sense."""


@dataclass(frozen=True)
class Header:
    kind: int
    step: int = 0
    shard: int = 0
    numel: int = 0
    version: int = 0
    sender: int = 0
    status: int = 0
    magic: int = MAGIC

    def encode(self) -> torch.Tensor:
        return torch.tensor([self.magic, self.kind, self.step, self.shard, self.numel,
                             self.version, self.sender, self.status], dtype=torch.int64)

    @classmethod
    def decode(cls, buf: torch.Tensor) -> "Header":
        magic, kind, step, shard, numel, version, sender, status = buf.tolist()
        return cls(kind, step, shard, numel, version, sender, status, magic)


def empty_header() -> torch.Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def validate_push(header: Header, shard: int, numel: int, last_step: int,
                  max_step: int | None, checkpoints: bool = False) -> Status:
    """Check a worker's message against what this server expects from that worker.

    ``last_step`` is the step of the worker's last push; ``checkpoints``: whether this server
    saves checkpoints (else a CHECKPOINT request is a kind it does not take).
    """
    if header.magic != MAGIC:
        return Status.BAD_MAGIC
    if header.kind not in (Kind.PUSH, Kind.DONE) and not (
            checkpoints and header.kind == Kind.CHECKPOINT):
        return Status.BAD_KIND
    if header.kind == Kind.DONE:
        return Status.OK
    if header.shard != shard:
        return Status.WRONG_SHARD
    if header.kind == Kind.CHECKPOINT:
        # Asked between steps: after the push of step s comes the checkpoint of step s + 1.
        return Status.OK if header.step == last_step + 1 else Status.STEP_OUT_OF_RANGE
    if header.numel != numel:
        return Status.WRONG_SIZE
    # A worker's steps count up by one; anything else is a stray or replayed message.
    if header.step != last_step + 1 or (max_step is not None and header.step >= max_step):
        return Status.STEP_OUT_OF_RANGE
    return Status.OK
