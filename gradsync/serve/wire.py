"""What crosses between the front process and a replica: fixed-layout frames, never pickles.

Every frame is a 32-byte little-endian header followed by ``length`` bytes::

    magic u32 | kind u32 | job u64 | rows u32 | cols u32 | length u64

    READY   replica -> front   rows = numbers per input row, cols = logits per row, no payload
    JOB     front -> replica   rows x cols float32 inputs (row-major)
    RESULT  replica -> front   rows x cols float32 logits, for the JOB with the same id
    ERROR   replica -> front   a UTF-8 message (the job failed; the replica lives on)

A data frame's length must equal rows * cols * 4, and no frame may exceed ``MAX_PAYLOAD``,
so a corrupt header is an error, never an allocation of whatever it says.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<IIQIIQ")  # magic, kind, job, rows, cols, length
MAGIC = 0x47534556  # "GSEV"
READY, JOB, RESULT, ERROR = 1, 2, 3, 4
MAX_PAYLOAD = 1 << 30


class WireError(Exception):
    """A frame that breaks the layout above (the peer is not a gradsync replica/front)."""


@dataclass
class Frame:
    kind: int
    job: int
    rows: int
    cols: int
    payload: bytes

    def array(self) -> np.ndarray:
        """The payload of a data frame as float32 ``(rows, cols)``."""
        return np.frombuffer(self.payload, dtype="<f4").reshape(self.rows, self.cols)


def encode(kind: int, job: int, rows: int, cols: int, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(MAGIC, kind, job, rows, cols, len(payload)) + payload


def encode_array(kind: int, job: int, array: np.ndarray) -> bytes:
    """A data frame holding ``array`` (2-D) as float32."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return encode(kind, job, data.shape[0], data.shape[1], data.tobytes())


def _check(header: bytes) -> tuple[int, int, int, int, int]:
    magic, kind, job, rows, cols, length = HEADER.unpack(header)
    if magic != MAGIC or kind not in (READY, JOB, RESULT, ERROR):
        raise WireError(f"bad frame header (magic {magic:#x}, kind {kind})")
    if length > MAX_PAYLOAD or (kind in (JOB, RESULT) and length != rows * cols * 4):
        raise WireError(f"bad frame length {length} for {rows} x {cols}")
    return kind, job, rows, cols, length


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Frame | None:
    """Read one frame from a blocking socket; None when the peer closed it."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    kind, job, rows, cols, length = _check(header)
    payload = _recv_exactly(sock, length) if length else b""
    if payload is None:
        return None
    return Frame(kind, job, rows, cols, payload)


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame from an asyncio stream; None when the peer closed it."""
    try:
        kind, job, rows, cols, length = _check(await reader.readexactly(HEADER.size))
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        return None
    return Frame(kind, job, rows, cols, payload)
