"""What crosses between the front process and a replica: fixed-layout frames, never pickles.

Every frame is a 32-byte little-endian header followed by ``length`` bytes::

    magic u32 | kind u16 | dtype u16 | job u64 | rows u32 | cols u32 | length u64

    READY   replica -> front   the model's inputs and outputs, as the protocol's metadata
                               (a small JSON object: see replica.py)
    JOB     front -> replica   rows x cols numbers of ``dtype`` (row-major): the inputs
    RESULT  replica -> front   rows x cols numbers of ``dtype``: the outputs of that JOB
    ERROR   replica -> front   a UTF-8 message (the job failed; the replica lives on)

``dtype`` is a code of DATATYPES (the protocol's datatypes that numpy holds). A data frame's
length must equal rows * cols * its item size, and no frame may exceed ``MAX_PAYLOAD``, so a
corrupt header is an error, never an allocation of whatever it says.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<IHHQIIQ")  # magic, kind, dtype, job, rows, cols, length
MAGIC = 0x47534556  # "GSEV"
READY, JOB, RESULT, ERROR = 1, 2, 3, 4
MAX_PAYLOAD = 1 << 30
# The Open Inference Protocol's datatypes that cross the wire: name -> (code, numpy dtype).
# BF16 and BOOL are left out (numpy has no bfloat16; a model's bool output is served as is
# nowhere yet); a model that takes or gives them is refused at start-up.
DATATYPES = {"FP32": (0, "<f4"), "FP64": (1, "<f8"), "FP16": (2, "<f2"), "INT64": (3, "<i8"),
             "INT32": (4, "<i4"), "INT16": (5, "<i2"), "INT8": (6, "<i1"), "UINT8": (7, "<u1")}
_BY_CODE = {code: np.dtype(np_dtype) for code, np_dtype in DATATYPES.values()}
_CODE_OF = {np.dtype(np_dtype): code for code, np_dtype in DATATYPES.values()}
_NAME_OF = {np.dtype(np_dtype): name for name, (_, np_dtype) in DATATYPES.items()}


def datatype_of(dtype: np.dtype) -> str | None:
    """The protocol's name of a numpy dtype (``"FP32"`` for float32), None if not served."""
    return _NAME_OF.get(np.dtype(dtype).newbyteorder("<"))


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype of DATATYPES (``"INT64"`` -> int64)."""
    return np.dtype(DATATYPES[datatype][1])


class WireError(Exception):
    """A frame that breaks the layout above (the peer is not a gradsync replica/front)."""


@dataclass
class Frame:
    kind: int
    dtype: int  # a DATATYPES code (data frames)
    job: int
    rows: int
    cols: int
    payload: bytes

    def array(self) -> np.ndarray:
        """The payload of a data frame as ``(rows, cols)`` of its dtype."""
        return np.frombuffer(self.payload, dtype=_BY_CODE[self.dtype]).reshape(self.rows,
                                                                                 self.cols)


def encode(kind: int, job: int, rows: int, cols: int, payload: bytes = b"",
           dtype: int = 0) -> bytes:
    """One frame as bytes."""
    return HEADER.pack(MAGIC, kind, dtype, job, rows, cols, len(payload)) + payload


def encode_array(kind: int, job: int, array: np.ndarray) -> bytes:
    """A data frame holding ``array`` (2-D, of a DATATYPES dtype), little-endian."""
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if dtype not in _CODE_OF:
        raise WireError(f"no frame carries dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype)
    return encode(kind, job, data.shape[0], data.shape[1], data.tobytes(), _CODE_OF[dtype])


def _check(header: bytes) -> tuple[int, int, int, int, int, int]:
    magic, kind, dtype, job, rows, cols, length = HEADER.unpack(header)
    if magic != MAGIC or kind not in (READY, JOB, RESULT, ERROR) or dtype not in _BY_CODE:
        raise WireError(f"bad frame header (magic {magic:#x}, kind {kind}, dtype {dtype})")
    if length > MAX_PAYLOAD or (kind in (JOB, RESULT)
                                and length != rows * cols * _BY_CODE[dtype].itemsize):
        raise WireError(f"bad frame length {length} for {rows} x {cols}")
    return kind, dtype, job, rows, cols, length


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
    kind, dtype, job, rows, cols, length = _check(header)
    payload = _recv_exactly(sock, length) if length else b""
    if payload is None:
        return None
    return Frame(kind, dtype, job, rows, cols, payload)


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame from an asyncio stream; None when the peer closed it."""
    try:
        kind, dtype, job, rows, cols, length = _check(await reader.readexactly(HEADER.size))
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        return None
    return Frame(kind, dtype, job, rows, cols, payload)
