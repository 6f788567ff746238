"""The Open Inference Protocol (KServe v2) as JSON: a model's metadata, parsing and checking an
inference request, and writing the response.

A request carries one input tensor (the model has one input)::

    {"id": "42", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                              "data": [0.0, 0.1, ...]}],
     "outputs": [{"name": "logits"}]}            # optional: which outputs to return

``data`` is the tensor in row-major order, flat (nested lists are accepted too). Triton's
binary tensor extension (what ``tritonclient``'s ``set_data_from_numpy`` sends by default) is
read as well: the JSON is the first ``Inference-Header-Content-Length`` bytes of the body, and
an input with ``parameters.binary_data_size`` takes its data from the bytes after it.
Outputs are always written as JSON.

Everything wrong with a request raises :class:`ProtocolError`, whose status (4xx) and one-line
message become the answer ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT, LOGITS, CLASS = "input", "logits", "class"


class ProtocolError(Exception):
    """A request the server cannot answer: HTTP ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelSpec:
    """What the served model takes and gives, as the protocol's metadata describes it.

    Attributes:
        name: the model's name (the workload's, e.g. "digits-mlp").
        version: the checkpoint's step, as a string.
        input_shape: one row's shape, e.g. ``(64,)`` or ``(1, 8, 8)``.
        classes: the logits per row.
        max_rows: the most rows one request may carry (``--max-request-rows``).
    """

    name: str
    version: str
    input_shape: tuple[int, ...]
    classes: int
    max_rows: int

    @property
    def row_size(self) -> int:
        """Numbers in one row."""
        return math.prod(self.input_shape)

    def metadata(self) -> dict[str, Any]:
        """The answer to ``GET /v2/models/{name}``; -1 is the batch dimension."""
        return {"name": self.name, "versions": [self.version], "platform": "pytorch",
                "inputs": [{"name": INPUT, "datatype": "FP32",
                            "shape": [-1, *self.input_shape]}],
                "outputs": [{"name": LOGITS, "datatype": "FP32", "shape": [-1, self.classes]},
                            {"name": CLASS, "datatype": "INT64", "shape": [-1]}]}

    def max_body_bytes(self) -> int:
        """A generous bound on the body of a request of ``max_rows`` rows: 32 bytes per
        number in JSON, plus room for the envelope. Larger bodies are refused unread."""
        return self.max_rows * self.row_size * 32 + 65536


@dataclass
class InferRequest:
    """A checked request: its rows as float32 ``(n, row_size)``, its id, and the outputs
    it asked for (in the order asked)."""

    rows: np.ndarray
    id: str | None
    outputs: list[str]


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body (Triton's binary tensor extension)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(400, f"Inference-Header-Content-Length is not a number: "
                                 f"{header_length!r}") from None
    if not 0 < n <= len(body):
        raise ProtocolError(400, f"Inference-Header-Content-Length {n} does not fit a body "
                                 f"of {len(body)} bytes")
    return body[:n], body[n:]


def _reject_constant(name: str) -> float:
    raise ProtocolError(400, f"input holds {name}: the model takes finite numbers only")


def parse_infer(spec: ModelSpec, body: bytes, header_length: str | None = None
                ) -> InferRequest:
    """Parse and check the body of ``POST /v2/models/{name}/infer``.

    Args:
        spec: the served model.
        body: the raw request body.
        header_length: the ``Inference-Header-Content-Length`` header, if any.

    Returns:
        The request's rows, id and requested outputs.

    Raises:
        ProtocolError: 400 for anything malformed (not JSON, wrong shape or datatype, empty,
            non-finite numbers), 413 for more rows than ``spec.max_rows``.
    """
    text, binary = _split_body(body, header_length)
    try:
        # JSON has no NaN, but Python's parser reads NaN and Infinity: refuse them here.
        request = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"request body is not JSON: {exc}") from None
    except RecursionError:  # e.g. 100,000 nested "[": Python's parser gives up, say so
        raise ProtocolError(400, "request body nests arrays or objects too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "request must be a JSON object with \"inputs\"")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"\"inputs\" must list exactly one tensor, named {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise ProtocolError(400, f"unknown input {tensor.get('name')!r}; the model's input "
                                 f"is {INPUT!r}")
    if tensor.get("datatype") != "FP32":
        raise ProtocolError(400, f"input datatype must be FP32, got "
                                 f"{tensor.get('datatype')!r}")
    rows = _tensor_rows(spec, tensor, binary)
    request_id = request.get("id")
    return InferRequest(rows, None if request_id is None else str(request_id),
                        _requested_outputs(request.get("outputs")))


def _tensor_rows(spec: ModelSpec, tensor: dict[str, Any], binary: bytes) -> np.ndarray:
    """The tensor's data as float32 rows ``(n, row_size)``, its shape checked."""
    shape = tensor.get("shape")
    expected = [-1, *spec.input_shape]
    if not isinstance(shape, list) or not all(type(d) is int for d in shape) \
            or len(shape) != len(expected) or list(shape[1:]) != list(spec.input_shape):
        raise ProtocolError(400, f"input shape must be {expected} (-1: any number of rows), "
                                 f"got {shape!r}")
    n = shape[0]
    if n < 1:
        raise ProtocolError(400, "empty request: the input has no rows")
    if n > spec.max_rows:
        raise ProtocolError(413, f"request of {n} rows is over the limit of {spec.max_rows} "
                                 "(--max-request-rows)")
    size = n * spec.row_size
    parameters = tensor.get("parameters") or {}
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        if parameters["binary_data_size"] != size * 4 or len(binary) != size * 4:
            raise ProtocolError(400, f"binary input must be {size * 4} bytes of FP32 for "
                                     f"shape {shape}, got {len(binary)}")
        rows = np.frombuffer(binary, dtype="<f4").astype(np.float32)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ProtocolError(400, "input has no \"data\" list")
        # Without a dtype first: numpy would read "1.5" as 1.5 and fail (OverflowError) on
        # an integer beyond float's range; what it infers says whether all are numbers.
        try:
            numbers = np.asarray(data)
        except (ValueError, TypeError, RecursionError):  # ragged, or nested too deeply
            numbers = None
        if numbers is None or numbers.dtype.kind not in "fiu" or _holds_bool(data):
            raise ProtocolError(400, "input data must be numbers within FP32's range (a flat "
                                     "or nested list of them, no strings or booleans)")
        with np.errstate(over="ignore"):  # beyond FP32: inf, refused below
            rows = numbers.astype(np.float32).reshape(-1)
        if rows.size != size:
            raise ProtocolError(400, f"input data holds {rows.size} numbers; shape {shape} "
                                     f"needs {size}")
    if not np.isfinite(rows).all():  # also catches numbers beyond float32's range
        raise ProtocolError(400, "input holds NaN or infinite values: the model takes "
                                 "finite numbers only")
    return rows.reshape(n, spec.row_size)


def _holds_bool(data: list) -> bool:
    """Whether a (nested) list holds a JSON true or false: numpy reads [true, 2.0] as
    [1.0, 2.0], so the dtype alone does not say."""
    stack = [data]
    while stack:
        for v in stack.pop():
            if v.__class__ is bool:
                return True
            if v.__class__ is list:
                stack.append(v)
    return False


def _requested_outputs(outputs: Any) -> list[str]:
    if outputs is None:
        return [LOGITS, CLASS]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(400, "\"outputs\" must be a list of {\"name\": ...} objects")
    names = [o.get("name") for o in outputs]
    for name in names:
        if name not in (LOGITS, CLASS):
            raise ProtocolError(400, f"unknown output {name!r}; the model gives "
                                     f"{LOGITS!r} and {CLASS!r}")
    return names


def infer_response(spec: ModelSpec, request: InferRequest, logits: np.ndarray
                   ) -> dict[str, Any]:
    """The answer to one request, given its logits ``(n, classes)``."""
    n = logits.shape[0]
    tensors = {LOGITS: {"name": LOGITS, "datatype": "FP32", "shape": [n, spec.classes],
                        "data": logits.reshape(-1).tolist()},
               CLASS: {"name": CLASS, "datatype": "INT64", "shape": [n],
                       "data": logits.argmax(axis=1).tolist()}}
    response: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version,
                                "outputs": [tensors[name] for name in request.outputs]}
    if request.id is not None:
        response["id"] = request.id
    return response
