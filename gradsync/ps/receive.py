"""A server's receive of one worker's messages, trusting none of their bytes.

Gloo takes a message shorter than the posted buffer without a word and leaves the rest of the
buffer as it was; a longer one makes it abort the whole process (``EnforceNotMet ...
op.preamble.length <= op.nbytes``, SIGABRT, no exception to catch). So every receive goes into
a buffer with ``SLACK_BYTES`` to spare beyond the expected end (fresh pages that are never
written cost no memory), armed before the receive:

    header:  [ random bytes ........ | END slot | canary ..... | slack ........ ]
                                       NOT_END    random bytes
    payload: [ one random 8-byte word, repeated over any payload, END and canary | slack ]

- a message that ran past the expected end changed the canary: too long, and the last byte
  that differs from it says by how much (at least);
- a message that stopped short left NOT_END (the complement of END, differing in every byte),
  or the payload's word (none of whose bytes is one of END's), where the sender's END must
  land: too short. Leftovers of the previous message cannot pass, as every buffer is armed
  again before its receive.

Gloo sends a message only once its receive is posted. Headers travel on a tag of their own
(``protocol.TAG``), payloads on another (``PAYLOAD_TAG``), so the receives of the headers a
worker will surely send next (the rest of the step's pushes) are posted ahead, and a step's
headers cross at once instead of each behind the payload before it. A payload's receive is
posted only once its header is in and declares a size that fits the buffer (with its slack):
a message declared longer than that is never asked for, so gloo never sends it, and its
sender is named and dropped like any other that overran, instead of aborting the server. As
the headers are in early, each payload's receive is posted while the payloads before it are
still on the wire: a payload no longer waits for its header's round trip (which, behind the
replies queued on the server's link, cost a step at 200 Mbit/s tens of milliseconds).
Every message from a worker has a payload (END alone after DONE and CHECKPOINT).

Then :func:`protocol.validate` checks the header's fields, and a PUSH's payload is received
only if the header is believable, into its own armed buffer; a compressed push is decoded
(``compression.py``: a sparse push's indices must be in range and distinct), its values are
checked for NaN and Inf, and it becomes the shard's dense gradient.
The header buffer is big enough to take a whole payload (a sender out of step sends its
gradient where the header belongs: too long, not an abort).

What still aborts inside gloo: a single message longer than its buffer plus the slack, i.e.
a payload that runs more than ``SLACK_BYTES`` past the size its own header declared, or
something more than a whole payload plus the slack sent where a header belongs. No receive
can be posted without a size, and gloo checks it only after it has taken the message.
"""

from __future__ import annotations

import os
import random
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .. import comm
from .compression import PushRules, decode, densify
from .protocol import (CODE_DTYPES, END_BYTES, HEADER_BYTES, HEADER_LEN, NOT_END_BYTES,
                       PAYLOAD_TAG, TAG, Header, Kind, Status, payload_nbytes, validate)

SLACK_BYTES = 4 << 20  # beyond the expected end of any message; only the canary is written
CANARY_BYTES = 256     # armed right after the expected end
_NOT_IN_END = [b for b in range(256) if b not in END_BYTES]
TRAILER_BYTES = len(END_BYTES)
AHEAD = 32  # header receives posted ahead at most (each buffer: a payload's capacity)


@dataclass
class Message:
    """One message as received, and the verdict on it."""

    header: Header
    status: Status = Status.OK
    text: str = ""  # what was wrong, naming the sender and the step; "" when OK
    payload: torch.Tensor | None = None  # a push: the gradient, (numel,) of the shard's dtype
    nbytes: int = 0  # a push: the payload's bytes on the wire, without END


def _fields(nbytes: int) -> str:
    return f"{nbytes // 8} int64 fields" if nbytes % 8 == 0 else f"{nbytes} bytes"


class Receiver:
    """Receives the messages of worker ``peer`` for shard ``shard`` of one server.

    Args:
        peer: the worker's group rank.
        shard: this server's shard number.
        parts: per partition of the shard, (numel, dtype).
        max_steps: pushes of steps >= this are rejected (None: no limit).
        checkpoints: whether CHECKPOINT requests are taken.
        rules: per partition, the compressed pushes taken beside dense ones (default: none).
        step: the step of this worker's first push (the server's, restored or 0).
    """

    def __init__(self, peer: int, group: comm.Group | None, shard: int,
                 parts: list[tuple[int, torch.dtype]], max_steps: int | None = None,
                 checkpoints: bool = False, rules: list[PushRules] | None = None,
                 step: int = 0):
        self.peer, self.group, self.shard = peer, group, shard
        self.parts = list(parts)
        self.max_steps, self.checkpoints = max_steps, checkpoints
        self.rules = rules or [PushRules() for _ in self.parts]
        # (numel, dtype, half, max_k) per partition, as protocol.validate takes them
        self._expect = [(n, d, r.half, r.max_k) for (n, d), r in zip(self.parts, self.rules)]
        self.payload_bytes = max([r.max_nbytes(d, n) for (n, d), r in zip(self.parts, self.rules)],
                                 default=0)
        self.capacity = self.payload_bytes + TRAILER_BYTES + SLACK_BYTES
        # Header receives posted ahead, oldest first: (buffer, armed bytes, work); buffers
        # of headers taken, for the next ones; headers taken, in order, each (header,
        # status, detail, its payload's receive or None, the step expected of it).
        self._posted: deque[tuple[torch.Tensor, torch.Tensor, comm.Work]] = deque()
        self._spare: list[torch.Tensor] = []
        self._taken: deque[tuple] = deque()
        self._step, self._seen = step, set()  # what the next header must be
        self._ended = False  # after DONE or a fault, no header is taken
        # the payload buffer's armed prefix: any payload, END and the canary
        self._fill = -(-(self.payload_bytes + TRAILER_BYTES + CANARY_BYTES) // 8) * 8
        # Canaries a sender cannot guess; not torch's generator, which the training seeds.
        self._rng = random.Random(os.urandom(16))
        self._post_headers()

    def receive(self, version: Callable[[], int]) -> Message:
        """Receive this worker's next message. Its header must follow the ones before it
        (the pushes of a step, one per partition, then the next step's; a CHECKPOINT
        between steps) and name a version <= ``version()``, asked once the header is in
        (the server's version grows while we wait, and the worker may have seen the newest).

        Raises:
            CommError: the worker was lost, or sent nothing within the timeout.
        """
        if not self._taken:
            self._take(version, block=True)
        while self._take(version, block=False):
            pass  # headers already in: their payloads' receives go out now, not in turn
        h, status, detail, received, step = self._taken.popleft()
        if received is None:
            return self._verdict(h, status, detail, step)
        buf, word, pay, nbytes = received
        pay.wait()
        if status == Status.OK:
            status, detail = self._check_payload(buf, nbytes, word)
        if status != Status.OK or h.kind not in (Kind.PUSH, Kind.PUSH_SPARSE):
            return self._verdict(h, status, detail, step)
        (numel, dtype), rules = self.parts[h.partition], self.rules[h.partition]
        # (nbytes,) of the buffer; the slack stays attached, unwritten
        status, detail, values, indices = decode(h.kind, h.numel, CODE_DTYPES[h.dtype],
                                                 buf[:nbytes], numel)
        if status != Status.OK:
            return self._verdict(h, status, detail, step)
        if not comm.all_finite(values):
            bad = values.numel() - int(torch.isfinite(values).sum())
            return Message(h, Status.NON_FINITE,
                           f"rank {self.peer} pushed a non-finite gradient at step {h.step}: "
                           f"{bad} of its {values.numel()} values are NaN or Inf", None, nbytes)
        grad = densify(values, indices, dtype, numel, rules)
        return Message(h, payload=grad, nbytes=nbytes)

    def _take(self, version: Callable[[], int], block: bool) -> bool:
        """Take the oldest posted header (``block``: wait for it; else only if it is in):
        check it, post its payload's receive when the size it declares fits, and post the
        receives of the headers still to come. Returns whether a header was taken."""
        if not self._posted or (not block and not self._posted[0][2].is_completed()):
            return False
        buf, armed, work = self._posted.popleft()
        work.wait()
        self._spare.append(buf)
        h = Header.decode(buf[:HEADER_BYTES].view(torch.int64))
        status, detail = self._check(buf, 0, HEADER_BYTES, armed, "header")
        first = self._expect[0] if self._expect else (0, None, None, None)
        if status == Status.OK:
            status, detail = validate(h, shard=self.shard, numel=first[0], step=self._step,
                                      dtype=first[1], version=version(), peer=self.peer,
                                      max_steps=self.max_steps, checkpoints=self.checkpoints,
                                      half=first[2], max_k=first[3],
                                      parts=self._expect or None, seen=self._seen)
        framed = status not in (Status.TOO_LONG, Status.TOO_SHORT, Status.BAD_MAGIC)
        push = h.kind in (Kind.PUSH, Kind.PUSH_SPARSE)
        # A payload follows (END alone after DONE and CHECKPOINT). Even after a bad header it
        # is received (and dropped) when its declared size fits, so that the sender's send
        # completes and it reads our ERROR. One that does not fit is never asked for: gloo
        # sends nothing into a receive that is not posted, so it cannot abort us.
        dtype = first[1]
        if 0 <= h.partition < len(self.parts):
            dtype = self.parts[h.partition][1]
        nbytes = payload_nbytes(h, dtype or torch.float32) if push else 0
        received = None
        if framed and (status == Status.OK or push) \
                and 0 <= nbytes <= self.payload_bytes + SLACK_BYTES - CANARY_BYTES:
            received = (*self._post_payload(h.step), nbytes)
        self._taken.append((h, status, detail, received, self._step))
        if status != Status.OK or h.kind == Kind.DONE:
            self._ended = True  # nothing after this message is taken
        elif push:
            self._seen.add(h.partition)
            if len(self._seen) == len(self.parts):  # the step's last partition
                self._step, self._seen = h.step + 1, set()
        self._post_headers()
        return True

    def _post_headers(self) -> None:
        """Keep the receives of the headers this worker will surely send posted, up to
        ``AHEAD``: the rest of this step's pushes and one more (the next step's first push,
        a CHECKPOINT or DONE); between steps only that one. Gloo sends a message only once
        its receive is posted, so the headers of a step cross at once, and every payload's
        receive is posted as soon as its header is in, while the payloads before it are
        still on the wire: no payload waits for its header's round trip."""
        if self._ended:
            return
        want = min(len(self.parts) - len(self._seen) + 1 if self._seen else 1, AHEAD)
        while len(self._posted) < want:
            buf = self._spare.pop() if self._spare else \
                torch.empty(HEADER_BYTES + self.capacity, dtype=torch.uint8)
            armed = self._arm(buf, 0, HEADER_BYTES)
            work = comm.irecv(buf, self.peer, self.group, TAG,
                              what=f"wait for the push of step {self._step}")
            self._posted.append((buf, armed, work))

    def _post_payload(self, step: int):
        """Post the receive of a payload whose header is in and fits, armed."""
        buf = torch.empty(self.capacity, dtype=torch.uint8)  # fresh: the gradient is a view
        word = self._arm_payload(buf)
        pay = comm.irecv(buf, self.peer, self.group, PAYLOAD_TAG, what=f"push of step {step}")
        return buf, word, pay

    def _arm_payload(self, buf: torch.Tensor) -> bytes:
        """Fill where any payload and its canary may land with a random 8-byte word none of
        whose bytes is one of END's: whatever the payload's size, a message that stopped
        short leaves no END where END must be, and one that ran on changes the canary."""
        word = bytes(self._rng.choice(_NOT_IN_END) for _ in range(8))
        buf[:self._fill].view(torch.int64).fill_(int.from_bytes(word, sys.byteorder,
                                                                 signed=True))
        return word

    def _check_payload(self, buf: torch.Tensor, nbytes: int, word: bytes
                       ) -> tuple[Status, str]:
        """Did the payload received into ``buf`` end exactly at ``nbytes`` + 8, with END?"""
        end = nbytes + TRAILER_BYTES
        tail = buf[end:end + CANARY_BYTES].numpy().tobytes()
        canary = (word * (CANARY_BYTES // 8 + 2))[end % 8:end % 8 + CANARY_BYTES]
        if tail != canary:
            written = end + max(i for i in range(CANARY_BYTES) if tail[i] != canary[i]) + 1
            return Status.TOO_LONG, (f"the payload is longer than its header declares (at "
                                     f"least {written} bytes, expected {end} with its end "
                                     "marker)")
        if buf[nbytes:end].numpy().tobytes() == END_BYTES:
            return Status.OK, ""
        return Status.TOO_SHORT, (f"the payload is shorter than its header declares ({end} "
                                  "bytes with its end marker)")

    def _verdict(self, h: Header, status: Status, detail: str, step: int) -> Message:
        if status == Status.OK:
            return Message(h)
        return Message(h, status, f"rank {self.peer} sent a malformed {h.kind_name()} at step "
                                  f"{step}: {detail}")

    def _arm(self, buf: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Write random bytes over [start, end - 8), NOT_END over the END slot [end - 8, end)
        and a random canary after it; return what was written, to compare after the receive."""
        rand = self._rng.randbytes
        armed = torch.frombuffer(bytearray(rand(end - TRAILER_BYTES - start) + NOT_END_BYTES
                                           + rand(CANARY_BYTES)), dtype=torch.uint8)
        buf[start:end + CANARY_BYTES].copy_(armed)
        return armed

    def _check(self, buf: torch.Tensor, start: int, end: int, armed: torch.Tensor,
               part: str) -> tuple[Status, str]:
        """Did the message received into ``buf`` end exactly at ``end``, with END?"""
        changed = (buf[start:end + CANARY_BYTES] != armed).nonzero()
        # Bytes written, at least: a written byte may equal the armed one by chance.
        written = start + (int(changed[-1]) + 1 if len(changed) else 0)
        if written > end:
            if part == "header":
                return Status.TOO_LONG, (f"the header is longer than the protocol's (at least "
                                         f"{_fields(written)}, expected {HEADER_LEN})")
            return Status.TOO_LONG, (f"the payload is longer than its header declares (at "
                                     f"least {written} bytes, expected {end} with its end "
                                     "marker)")
        if buf[end - TRAILER_BYTES:end].numpy().tobytes() == END_BYTES:
            return Status.OK, ""
        if part == "payload":
            return Status.TOO_SHORT, (f"the payload is shorter than its header declares "
                                      f"({end} bytes with its end marker)")
        if written < end:
            return Status.TOO_SHORT, (f"the header is shorter than the protocol's "
                                      f"({_fields(written)}, expected {HEADER_LEN})")
        return Status.OK, ""  # full length, but a wrong end marker: validate() names it
