"""The Open Inference Protocol (KServe v2) as JSON: a model's metadata, parsing and checking an
inference request, and writing the response.

A request carries one input tensor (every served model has one input and one output; a
built-in workload's output, "logits", comes with its argmax, "class")::

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

from .wire import numpy_dtype

CLASS = "class"  # the argmax output that built-in workloads add to their logits


class ProtocolError(Exception):
    """A request the server cannot answer: HTTP ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: its name, the protocol's datatype ("FP32", "INT64",
    ...) and one row's shape (without the batch dimension, e.g. ``(1, 28, 28)``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def row_size(self) -> int:
        """Numbers in one row."""
        return math.prod(self.shape)

    def metadata(self) -> dict[str, Any]:
        """As the protocol's metadata lists it; -1 is the batch dimension."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}

    @classmethod
    def from_metadata(cls, value: dict[str, Any]) -> TensorSpec:
        """The inverse of :meth:`metadata` (what a replica says READY with)."""
        return cls(str(value["name"]), str(value["datatype"]),
                   tuple(int(d) for d in value["shape"][1:]))


@dataclass(frozen=True)
class ModelSpec:
    """What a served model takes and gives, as the protocol's metadata describes it.

    Attributes:
        name: the model's name at ``/v2/models/{name}`` (a workload's, e.g. "digits-mlp",
            or the one --model gave).
        version: the checkpoint's step, or "1" for a program, as a string.
        input: its one input.
        output: its one output (a built-in workload's: "logits").
        max_rows: the most rows one request may carry (``--max-request-rows``).
        argmax: whether the output's argmax over its last axis is offered as "class"
            (built-in workloads: the predicted class, or the next token of stdlib-gpt).
    """

    name: str
    version: str
    input: TensorSpec
    output: TensorSpec
    max_rows: int
    argmax: bool = False

    @property
    def row_size(self) -> int:
        """Numbers in one input row."""
        return self.input.row_size

    def output_names(self) -> list[str]:
        return [self.output.name, CLASS] if self.argmax else [self.output.name]

    def metadata(self) -> dict[str, Any]:
        """The answer to ``GET /v2/models/{name}``; -1 is the batch dimension."""
        outputs = [self.output.metadata()]
        if self.argmax:
            outputs.append({"name": CLASS, "datatype": "INT64",
                            "shape": [-1, *self.output.shape[:-1]]})
        return {"name": self.name, "versions": [self.version], "platform": "pytorch",
                "inputs": [self.input.metadata()], "outputs": outputs}

    @classmethod
    def from_ready(cls, name: str, version: str, ready: dict[str, Any], max_rows: int
                   ) -> ModelSpec:
        """The spec of a model whose replicas said READY with ``ready`` (model.Served)."""
        return cls(name, version, TensorSpec.from_metadata(ready["input"]),
                   TensorSpec.from_metadata(ready["output"]), max_rows, bool(ready["argmax"]))

    def max_body_bytes(self) -> int:
        """A generous bound on the body of a request of ``max_rows`` rows: 32 bytes per
        number in JSON, plus room for the envelope. Larger bodies are refused unread."""
        return self.max_rows * self.row_size * 32 + 65536


@dataclass
class InferRequest:
    """A checked request: its rows ``(n, row_size)`` of the input's dtype, its id, and the
    outputs it asked for (in the order asked)."""

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
        raise ProtocolError(400, f"\"inputs\" must list exactly one tensor, named "
                                 f"{spec.input.name!r}")
    tensor, want = inputs[0], spec.input
    if tensor.get("name") != want.name:
        raise ProtocolError(400, f"unknown input {tensor.get('name')!r}; the model's input "
                                 f"is {want.name!r}")
    if tensor.get("datatype") != want.datatype:
        raise ProtocolError(400, f"input datatype must be {want.datatype}, got "
                                 f"{tensor.get('datatype')!r}")
    rows = _tensor_rows(spec, tensor, binary)
    request_id = request.get("id")
    return InferRequest(rows, None if request_id is None else str(request_id),
                        _requested_outputs(spec, request.get("outputs")))


def _tensor_rows(spec: ModelSpec, tensor: dict[str, Any], binary: bytes) -> np.ndarray:
    """The tensor's data as rows ``(n, row_size)`` of the input's dtype, its shape checked."""
    want = spec.input
    shape = tensor.get("shape")
    expected = [-1, *want.shape]
    if not isinstance(shape, list) or not all(type(d) is int for d in shape) \
            or len(shape) != len(expected) or list(shape[1:]) != list(want.shape):
        raise ProtocolError(400, f"input shape must be {expected} (-1: any number of rows), "
                                 f"got {shape!r}")
    n = shape[0]
    if n < 1:
        raise ProtocolError(400, "empty request: the input has no rows")
    if n > spec.max_rows:
        raise ProtocolError(413, f"request of {n} rows is over the limit of {spec.max_rows} "
                                 "(--max-request-rows)")
    size, dtype = n * want.row_size, numpy_dtype(want.datatype)
    parameters = tensor.get("parameters") or {}
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        nbytes = size * dtype.itemsize
        if parameters["binary_data_size"] != nbytes or len(binary) != nbytes:
            raise ProtocolError(400, f"binary input must be {nbytes} bytes of "
                                     f"{want.datatype} for shape {shape}, got {len(binary)}")
        rows = np.frombuffer(binary, dtype=dtype)
    else:
        rows = _json_numbers(tensor.get("data"), want.datatype, dtype)
        if rows.size != size:
            raise ProtocolError(400, f"input data holds {rows.size} numbers; shape {shape} "
                                     f"needs {size}")
    if dtype.kind == "f" and not np.isfinite(rows).all():  # also beyond float32's range
        raise ProtocolError(400, "input holds NaN or infinite values: the model takes "
                                 "finite numbers only")
    return rows.reshape(n, want.row_size)


def _json_numbers(data: Any, datatype: str, dtype: np.dtype) -> np.ndarray:
    """A JSON ``data`` list (flat or nested) as a flat array of ``dtype``; integers only for
    an integer datatype, each within its range."""
    if not isinstance(data, list):
        raise ProtocolError(400, "input has no \"data\" list")
    # Without a dtype first: numpy would read "1.5" as 1.5 and fail (OverflowError) on
    # an integer beyond float's range; what it infers says whether all are numbers.
    try:
        numbers = np.asarray(data)
    except (ValueError, TypeError, RecursionError):  # ragged, or nested too deeply
        numbers = None
    integral = dtype.kind in "iu"
    kinds = "iu" if integral else "fiu"
    if numbers is None or numbers.dtype.kind not in kinds or _holds_bool(data):
        what = "integers" if integral else "numbers"
        raise ProtocolError(400, f"input data must be {what} within {datatype}'s range (a "
                                 "flat or nested list of them, no strings or booleans)")
    if integral and numbers.size:
        info = np.iinfo(dtype)
        if numbers.min() < info.min or numbers.max() > info.max:
            raise ProtocolError(400, f"input data must be integers within {datatype}'s "
                                     f"range [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # beyond FP32: inf, refused by the caller
        return numbers.astype(dtype).reshape(-1)


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


def _requested_outputs(spec: ModelSpec, outputs: Any) -> list[str]:
    known = spec.output_names()
    if outputs is None:
        return known
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(400, "\"outputs\" must be a list of {\"name\": ...} objects")
    names = [o.get("name") for o in outputs]
    for name in names:
        if name not in known:
            raise ProtocolError(400, f"unknown output {name!r}; the model gives "
                                     f"{' and '.join(map(repr, known))}")
    return names


def infer_response(spec: ModelSpec, request: InferRequest, output: np.ndarray
                   ) -> dict[str, Any]:
    """The answer to one request, given its output rows ``(n, output row_size)``."""
    n, out = output.shape[0], spec.output
    shaped = output.reshape(n, *out.shape)  # e.g. (n, classes) or (n, seq, vocab)
    tensors = {out.name: {"name": out.name, "datatype": out.datatype, "shape": [n, *out.shape],
                          "data": output.reshape(-1).tolist()}}
    if spec.argmax:
        tensors[CLASS] = {"name": CLASS, "datatype": "INT64", "shape": [n, *out.shape[:-1]],
                          "data": shaped.argmax(axis=-1).reshape(-1).tolist()}
    response: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version,
                                "outputs": [tensors[name] for name in request.outputs]}
    if request.id is not None:
        response["id"] = request.id
    return response
