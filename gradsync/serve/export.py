"""A user's model, loaded in a replica: a ``torch.export`` program (``.pt2``), or a
``module:factory`` whose module the newest committed checkpoint's ``"model"`` state fills.

A program says what it takes: its one user input's name (the forward's argument), dtype and
shape come from the placeholder's example value (a fake tensor whose dim 0 is a symbol when
it was exported with ``torch.export.Dim``). Its output is named by the key when ``forward``
returns a one-entry dict, else "output". A program whose batch dimension is static (B rows)
computes any number of rows B at a time, the last chunk padded with rows of zeros that are
dropped: rows must not depend on each other (eval mode; no batch statistics).

What loading trusts: ``torch.export.load`` reads an archive that may hold pickles, and torch
(2.13) unpickles some parts with ``weights_only=False`` (its own docstring: never load data
from an untrusted source). A ``.pt2`` is trusted as code is. A factory is the user's code,
imported; only its checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch

from .model import Checkpoint, ServeError, Served, described_output, torch_datatype
from .protocol import TensorSpec


def load_program(path: str | Path) -> Served:
    """The program saved by ``torch.export.save`` at ``path``, as a replica runs it.

    Raises:
        ServeError: it does not load, or takes other than one tensor of a served datatype
            with fixed row dimensions.
    """
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: name it, one line
        raise ServeError(f"cannot load program {path}: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                         ) from None
    input_spec, batch = _program_input(program, path)
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        return _output(module(x), path)

    forward = run if batch is None else _in_chunks(run, batch)
    return Served(forward, input_spec, described_output(forward, input_spec,
                                                        _output_name(program)))


def _program_input(program, path) -> tuple[TensorSpec, int | None]:
    """(the user input's spec, its static batch size or None when dim 0 is dynamic)."""
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        raise ServeError(f"program {path} takes {len(names)} inputs {list(names)}; gradsync "
                         "serve serves programs of one input tensor")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    value = node.meta.get("val")  # a fake tensor (b, ...), b a SymInt when dim 0 is dynamic
    datatype = torch_datatype(value.dtype) if isinstance(value, torch.Tensor) else None
    if datatype is None or value.dim() < 1:
        raise ServeError(f"program {path}: input {names[0]!r} is "
                         f"{getattr(value, 'dtype', type(value).__name__)}; gradsync serve "
                         "takes one tensor of FP32, FP64, FP16 or an integer type, batch first")
    dims = list(value.shape)
    for i, d in enumerate(dims[1:], 1):
        if isinstance(d, torch.SymInt):
            raise ServeError(f"program {path}: dim {i} of input {names[0]!r} is dynamic; "
                             "rows of one shape are batched together, so only dim 0 (the "
                             "batch) may be: export with that dim static")
    batch = None if isinstance(dims[0], torch.SymInt) else int(dims[0])
    return TensorSpec(names[0], datatype, tuple(int(d) for d in dims[1:])), batch


def _output_name(program) -> str:
    """The key of a one-entry dict that ``forward`` returns, else "output"."""
    spec = program.call_spec.out_spec
    if spec is not None and spec.type is dict and len(spec.context) == 1:
        return str(spec.context[0])
    return "output"


def _output(y, where) -> torch.Tensor:
    """The one tensor a model returned (bare, or alone in a dict, tuple or list)."""
    if isinstance(y, dict) and len(y) == 1:
        y = next(iter(y.values()))
    elif isinstance(y, (tuple, list)) and len(y) == 1:
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise ServeError(f"{where} returned {type(y).__name__}; gradsync serve serves "
                         "models with one output tensor")
    return y.float() if y.dtype == torch.bfloat16 else y


def _in_chunks(run, batch: int):
    """``run`` for a program whose batch is always ``batch`` rows: any number of rows, in
    chunks of ``batch``, the last one padded with zero rows that are then dropped."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        padded = torch.cat([x, x.new_zeros(math.ceil(n / batch) * batch - n, *x.shape[1:])])
        return torch.cat([run(chunk) for chunk in padded.split(batch)])[:n]

    return forward


def load_factory(factory: str, checkpoint: Checkpoint, input_shape: tuple[int, ...],
                 input_datatype: str | None) -> Served:
    """``factory()``'s module (``"package.module:function"``, called with no arguments) with
    the ``"model"`` state of ``checkpoint`` loaded strictly, in eval mode. Its input is the
    module's ``example_input`` attribute's row (a tensor, batch first) or else
    ``input_shape`` and ``input_datatype`` (--input-shape, --input-dtype).

    Raises:
        ServeError: the factory cannot be imported or called, the state does not fit it, or
            no input spec is known.
    """
    from ..checkpoint.format import CheckpointError
    from ..checkpoint.reader import CheckpointReader

    module_name, _, attr = factory.partition(":")
    try:
        model = getattr(importlib.import_module(module_name), attr)()
    except Exception as exc:  # noqa: BLE001 - the user's code: name what it raised
        raise ServeError(f"--model {factory}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ServeError(f"--model {factory} returned {type(model).__name__}, not a "
                         "torch.nn.Module")
    try:
        state, _, _ = CheckpointReader(checkpoint.directory).load(checkpoint.step)
        model.load_state_dict(state["model"])  # strict: every key, every shape
    except (CheckpointError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ServeError(f"checkpoint step {checkpoint.step} of {checkpoint.source or ''} "
                         f"does not fit --model {factory}: {first}") from None
    model.eval()
    example = getattr(model, "example_input", None)
    if isinstance(example, torch.Tensor) and example.dim() >= 1:
        input_shape, input_datatype = tuple(example.shape[1:]), torch_datatype(example.dtype)
    if not input_shape or input_datatype is None:
        raise ServeError(f"--model {factory}: give its input (--input-shape 1,28,28 "
                         "--input-dtype FP32), or an example_input tensor attribute on the "
                         "module it returns")
    input_spec = TensorSpec("input", input_datatype, input_shape)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _output(model(x), f"--model {factory}")

    return Served(forward, input_spec, described_output(forward, input_spec, "output"))
