"""The Parameter Server's wire format: a fixed-layout int64 header, then at most one tensor.

Nothing else crosses the network, and nothing is unpickled. Every message from a worker to a
server, and every reply, is

    header: int64[11] = [MAGIC, kind, step, shard, numel, version, sender, status, dtype,
                         partition, END]
    payload: PUSH (worker -> server): numel elements of one partition of the shard
             (``sharding.py``; its index in ``partition``), of its dtype (code ``dtype``), then
             the 8 bytes of END again, so that a payload shorter than declared is seen; under
             --compression fp16/bf16 the elements may be of that half dtype (holding the
             gradient divided by the number of workers);
             PUSH_SPARSE (worker -> server, --compression topk): numel entries, int64 indices
             then values of the shard's dtype, then END (``compression.py``);
             DONE, CHECKPOINT (worker -> server): END alone, so that every message from a
             worker is a header and a payload, whose receives a server posts before the
             message comes (gloo sends only into a posted receive);
             PARAMS (server -> worker): one partition's parameters, the tensor alone;
             ERROR, STATS (server -> worker): the tensor alone;
             SAVED has none

headers on tag 0 of the pair (``TAG``), payloads on tag 1 (``PAYLOAD_TAG``): each stream
arrives in order, and a server posts the receives of a worker's next headers ahead, while
the payloads before them still travel (``receive.py``). :func:`send_message` frames both for
the workers' sends and the servers' replies. A worker pushes every partition
of every step once, in any order; a server answers each worker's partitions in the order that
worker pushed them, so the worker's receives, posted at each push, match its replies.

A server trusts nothing a worker sends (``receive.py``). Gloo takes a message shorter than the
posted buffer silently and aborts the whole process (``EnforceNotMet``, uncatchable) on one
that is longer, so the server receives into buffers with slack beyond the expected end, armed
before every receive: random canary bytes right after the expected end (changed: the message
was longer) and the complement of END where END must land (still there: it was shorter).
:func:`validate` then checks the header's fields (magic, sender, kind, shard, step, version,
size, dtype) before the payload is received, and the payload's end marker, canary and values
(NaN or Inf) after. A bad message is answered with an ERROR reply whose ``status`` says what
was wrong; the server's own error names the sender and the fault.

Limits, honestly: a payload is received only once its header declares a size that fits
(beyond that the sender is dropped and the payload never asked for), but a message longer
than its buffer plus the slack (``receive.SLACK_BYTES`` beyond the declared size, or beyond a
whole shard where a header belongs) still aborts inside gloo, as no receive can be posted
without a size; a sender that declares a payload and never sends it is noticed only at the
timeout, as a lost worker; extra bytes that happen to equal the random canary pass unseen
(probability 256^-n for n bytes, and the expected fields are intact then). Replies from
servers to workers are not armed this way: a worker trusts its servers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import IntEnum

import torch

from .. import comm
from .stats import HIST_BINS, ServerStats  # noqa: F401 - re-exported: STATS's payload

MAGIC = 0x6753_5053  # "gSPS"
END = 0x454E_4421_6753_5053  # "END!gSPS": the last header field, and a PUSH payload's trailer
HEADER_LEN = 11
HEADER_BYTES = HEADER_LEN * 8
END_BYTES = END.to_bytes(8, sys.byteorder)  # as an int64 tensor holds it
NOT_END_BYTES = bytes(b ^ 0xFF for b in END_BYTES)  # differs from END in every byte
TAG = 0          # headers
PAYLOAD_TAG = 1  # payloads: a stream of their own, so headers can run ahead of them

# Payload dtypes on the wire; 0 is "no payload".
DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Kind(IntEnum):
    PUSH = 1      # worker -> server: gradient of one shard for one step
    PARAMS = 2    # server -> worker: fresh parameters of one shard
    DONE = 3      # worker -> server: no more pushes from this worker
    ERROR = 4     # server -> worker: the last message was rejected (payload: zeros)
    STATS = 5     # server -> worker, at the end: ServerStats as float64
    CHECKPOINT = 6  # worker -> server: at step ``step``, save your shard once all workers ask
    SAVED = 7     # server -> worker: the shard of that step is on disk (status: complete?)
    PUSH_SPARSE = 8  # worker -> server: top-k of one shard's gradient; numel: entries


class Status(IntEnum):
    OK = 0
    BAD_MAGIC = 1
    BAD_KIND = 2
    WRONG_SHARD = 3
    WRONG_SIZE = 4
    STEP_OUT_OF_RANGE = 5
    INCOMPLETE = 6  # SAVED, but a dropped worker's state is missing from the checkpoint
    TOO_LONG = 7
    TOO_SHORT = 8
    VERSION_OUT_OF_RANGE = 9
    WRONG_DTYPE = 10
    NON_FINITE = 11
    WRONG_SENDER = 12
    BAD_INDEX = 13  # a sparse push's index is out of range or repeated
    BAD_PARTITION = 14  # the partition index is out of range, or pushed twice in a step


STATUS_TEXT = {
    Status.BAD_MAGIC: "the header's magic number or end marker is wrong",
    Status.BAD_KIND: "the message kind is unknown, or not one this server takes",
    Status.WRONG_SHARD: "the message names a shard this server does not hold",
    Status.WRONG_SIZE: "the payload size does not match the shard",
    Status.STEP_OUT_OF_RANGE: "the step is out of range",
    Status.INCOMPLETE: "a worker was dropped, so the checkpoint lacks its state",
    Status.TOO_LONG: "the message is longer than the protocol's",
    Status.TOO_SHORT: "the message is shorter than the protocol's",
    Status.VERSION_OUT_OF_RANGE: "the parameter version is out of range",
    Status.WRONG_DTYPE: "the payload's dtype does not match the shard",
    Status.NON_FINITE: "the gradient holds NaN or Inf values",
    Status.WRONG_SENDER: "the header names another sender",
    Status.BAD_INDEX: "a sparse push's index is out of range or repeated",
    Status.BAD_PARTITION: "the partition is out of range or was pushed twice in one step",
}


def status_text(code: int) -> str:
    """What a status code in an ERROR reply means (also for codes this version lacks)."""
    try:
        return STATUS_TEXT[Status(code)]
    except (ValueError, KeyError):
        return f"status {code}"


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
    dtype: int = 0  # DTYPE_CODES of the payload; 0: none
    partition: int = 0  # which partition of the shard (PUSH, PUSH_SPARSE, PARAMS)
    magic: int = MAGIC
    end: int = END

    def encode(self) -> torch.Tensor:
        return torch.tensor([self.magic, self.kind, self.step, self.shard, self.numel,
                             self.version, self.sender, self.status, self.dtype,
                             self.partition, self.end],
                            dtype=torch.int64)

    @classmethod
    def decode(cls, buf: torch.Tensor) -> "Header":
        magic, kind, step, shard, numel, version, sender, status, dtype, partition, end = \
            buf.tolist()
        return cls(kind, step, shard, numel, version, sender, status, dtype, partition, magic,
                   end)

    def kind_name(self) -> str:
        """``PUSH``, ``DONE``, ...; "message" when the header is not this protocol's."""
        if self.magic == MAGIC and self.kind in Kind._value2member_map_:
            return Kind(self.kind).name
        return "message"


def empty_header() -> torch.Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def send_message(header: Header, payload: torch.Tensor | None, dst: int,
                 group: comm.Group | None, what: str = "send") -> list[comm.Work]:
    """Start sending one message to group rank ``dst``: the header, then the payload if any.

    Returns:
        the sends' handles. Each keeps its tensor alive until it is done; ``payload`` must
        not change before then.
    """
    works = [comm.isend(header.encode(), dst, group, TAG, what=what)]
    if payload is not None:
        works.append(comm.isend(payload, dst, group, PAYLOAD_TAG, what=what))
    return works


def dtype_name(code: int) -> str:
    dtype = CODE_DTYPES.get(code)
    return str(dtype).removeprefix("torch.") if dtype is not None else f"unknown dtype code {code}"


def payload_nbytes(h: Header, dtype: torch.dtype) -> int:
    """Bytes of the payload ``h`` declares (without END); ``dtype`` if its code is unknown."""
    size = CODE_DTYPES.get(h.dtype, dtype).itemsize
    return h.numel * (size + 8 if h.kind == Kind.PUSH_SPARSE else size)  # + int64 indices


def validate(h: Header, *, shard: int, numel: int, step: int, dtype: torch.dtype | None = None,
             version: int | None = None, peer: int | None = None, max_steps: int | None = None,
             checkpoints: bool = False, half: torch.dtype | None = None,
             max_k: int | None = None, parts: list | None = None,
             seen: frozenset[int] | set[int] = frozenset()) -> tuple[Status, str]:
    """Check the fields of a worker's header against what this server expects from it.

    Args:
        h: the decoded header (its length and end marker are checked by the receiver).
        shard, numel, dtype: this server's shard number, element count and dtype.
        step: the step this worker must send next (its last push's step + 1).
        version: the newest version of the shard the server has produced; a push computed on
            a newer one cannot exist. None: not checked.
        peer: the group rank the message came from; None: the sender field is not checked.
        max_steps: pushes of steps >= this are out of range (None: no limit).
        checkpoints: whether this server saves checkpoints (else CHECKPOINT is a kind it
            does not take).
        half: a PUSH may also carry this dtype (--compression fp16/bf16).
        max_k: a PUSH_SPARSE may carry at most this many entries (--compression topk);
            None: PUSH_SPARSE is a kind this server does not take.
        parts: per partition of the shard, (numel, dtype, half, max_k), which then replace
            ``numel``, ``dtype``, ``half`` and ``max_k``; None: one partition, partition 0.
        seen: partitions this worker has pushed in this step already (a CHECKPOINT must come
            between steps, when none is).

    Returns:
        (Status.OK, "") or the first fault and a sentence saying what exactly was wrong.
    """
    fault = _check_envelope(h, peer, checkpoints, max_k)
    if fault is not None:
        return fault
    if h.kind == Kind.DONE:
        return Status.OK, ""
    if h.shard != shard:
        return Status.WRONG_SHARD, f"it names shard {h.shard}; this server holds shard {shard}"
    # A worker's steps count up by one; anything else is a stray or replayed message.
    # Asked between steps: after the push of step s comes the checkpoint of step s + 1.
    if h.step != step:
        return Status.STEP_OUT_OF_RANGE, f"step {h.step}, expected step {step}"
    if h.kind == Kind.CHECKPOINT:
        if seen:
            return Status.STEP_OUT_OF_RANGE, (f"a CHECKPOINT request in the middle of step "
                                              f"{step}'s pushes")
        return Status.OK, ""
    count = 1 if parts is None else len(parts)
    if not 0 <= h.partition < count:
        return Status.BAD_PARTITION, (f"it names partition {h.partition}; shard {shard} has "
                                      f"{count}")
    if h.partition in seen:
        return Status.BAD_PARTITION, (f"partition {h.partition} of step {step} was pushed "
                                      "already")
    if parts is not None:
        numel, dtype, half, max_k = parts[h.partition]
    if max_steps is not None and h.step >= max_steps:
        return Status.STEP_OUT_OF_RANGE, f"step {h.step} is past the run's {max_steps} steps"
    if version is not None and not 0 <= h.version <= version:
        return Status.VERSION_OUT_OF_RANGE, (f"it was computed on version {h.version} of the "
                                             f"shard; the server's versions are 0..{version}")
    return _check_payload(h, numel, dtype, half, max_k, parts is None or len(parts) == 1)


def _check_envelope(h: Header, peer: int | None, checkpoints: bool,
                    max_k: int | None) -> tuple[Status, str] | None:
    """The checks of :func:`validate` that hold for every kind: the markers, the sender, a
    kind this server takes, no payload where the kind has none. None: all passed."""
    if h.magic != MAGIC:
        return Status.BAD_MAGIC, f"the header's magic number is {h.magic:#x}, not {MAGIC:#x}"
    if h.end != END:
        return Status.BAD_MAGIC, f"the header's end marker is {h.end:#x}, not {END:#x}"
    if peer is not None and h.sender != peer:
        return Status.WRONG_SENDER, f"the header names sender {h.sender}, not rank {peer}"
    if h.kind not in Kind._value2member_map_:
        return Status.BAD_KIND, f"unknown message kind {h.kind}"
    if h.kind not in (Kind.PUSH, Kind.PUSH_SPARSE, Kind.DONE, Kind.CHECKPOINT):
        return Status.BAD_KIND, f"a worker does not send {Kind(h.kind).name} messages"
    if h.kind == Kind.CHECKPOINT and not checkpoints:
        return Status.BAD_KIND, "a CHECKPOINT request, but this run takes no checkpoints"
    if h.kind == Kind.PUSH_SPARSE and max_k is None:
        return Status.BAD_KIND, "a PUSH_SPARSE, but this run does not compress with top-k"
    if h.kind not in (Kind.PUSH, Kind.PUSH_SPARSE) and h.numel != 0:
        return Status.WRONG_SIZE, (f"a {Kind(h.kind).name} message declares a payload of "
                                   f"{h.numel} elements; it has none")
    return None


def _check_payload(h: Header, numel: int, dtype: torch.dtype | None, half: torch.dtype | None,
                   max_k: int | None, whole_shard: bool) -> tuple[Status, str]:
    """The size and dtype a push declares, against its partition's (``whole_shard``: the
    shard has one partition, and the fault names the shard)."""
    if h.kind == Kind.PUSH_SPARSE:
        if not 0 <= h.numel <= max_k:
            return Status.WRONG_SIZE, (f"it declares {h.numel} entries; a top-k push of this "
                                       f"shard has at most {max_k}")
    elif h.numel != numel:
        return Status.WRONG_SIZE, (f"its payload has {h.numel} elements; the shard has {numel}"
                                   if whole_shard else
                                   f"its payload has {h.numel} elements; partition "
                                   f"{h.partition} has {numel}")
    # A sparse push's values are of the shard's dtype; a dense one's may be the half dtype.
    allowed = (dtype,) if half is None or h.kind == Kind.PUSH_SPARSE else (dtype, half)
    if dtype is not None and CODE_DTYPES.get(h.dtype) not in allowed:
        also = f" (or {dtype_name(DTYPE_CODES[half])})" if len(allowed) > 1 else ""
        return Status.WRONG_DTYPE, (f"its payload is {dtype_name(h.dtype)}; the shard is "
                                    f"{str(dtype).removeprefix('torch.')}{also}")
    return Status.OK, ""


def validate_push(header: Header, shard: int, numel: int, last_step: int,
                  max_step: int | None, checkpoints: bool = False) -> Status:
    """The status of :func:`validate` for a worker whose last push was ``last_step``."""
    return validate(header, shard=shard, numel=numel, step=last_step + 1, max_steps=max_step,
                    checkpoints=checkpoints)[0]
