"""The served model: the newest committed checkpoint of a `gradsync train` run, its workload's
model, in eval mode; and :class:`Served`, any loaded model as a replica runs it (export.py
loads the others: programs and module:factory models).

The checkpoint records the workload's name, the settings it was built with (``--hidden``,
``--dtype``, ``--seed``) and the model's state; the workload builds the model with those
settings, and the state must load into it exactly. Checkpoints written before the settings
were recorded have them read back from the state's shapes and dtype instead.

The replicas load the served step from the front's private copy of it (hard links where the
file system allows), so that training which shares the directory may prune that step while
the server runs: a replica restarted later still loads the model the server announced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.format import CheckpointError, step_dirname
from ..checkpoint.reader import CheckpointReader
from .protocol import TensorSpec
from .wire import DATATYPES, datatype_of, numpy_dtype

log = logging.getLogger(__name__)

class ServeError(Exception):
    """Nothing can be served (no committed checkpoint, a model that cannot load): one line."""


@dataclass
class Served:
    """A loaded model as a replica runs it: ``forward`` maps a batch ``(n, *input.shape)``
    of the input's dtype to ``(n, *output.shape)`` of the output's; ``argmax``: offer the
    output's argmax over its last axis as "class" (built-in workloads)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    input: TensorSpec
    output: TensorSpec
    argmax: bool = False

    def ready_json(self) -> bytes:
        """What the replica says READY with (wire.py): the metadata the front serves."""
        return json.dumps({"input": self.input.metadata(), "output": self.output.metadata(),
                           "argmax": self.argmax}).encode()


def torch_datatype(dtype: torch.dtype) -> str | None:
    """The protocol's datatype of a torch dtype that frames carry (None for bf16, bool)."""
    if dtype in (torch.bfloat16, torch.bool):
        return None
    return datatype_of(torch.empty(0, dtype=dtype).numpy().dtype)


def described_output(forward, input_spec: TensorSpec, name: str) -> TensorSpec:
    """The output's spec, from ``forward`` on one row of zeros (valid token ids too).

    Raises:
        ServeError: the model fails on it, or gives a datatype that frames do not carry.
    """
    x = torch.zeros(1, *input_spec.shape, dtype=_torch_dtype(input_spec.datatype))
    try:
        with torch.inference_mode():
            y = forward(x)
    except Exception as exc:  # noqa: BLE001 - the user's model: say what it raised
        raise ServeError(f"model {name!r} fails on one row of zeros of shape "
                         f"{list(x.shape)} ({input_spec.datatype}): "
                         f"{type(exc).__name__}: {exc}") from None
    datatype = torch_datatype(y.dtype) if isinstance(y, torch.Tensor) else None
    if datatype is None or y.dim() < 1 or y.shape[0] != 1:
        raise ServeError(f"model {name!r} must return one tensor of a served datatype "
                         f"({', '.join(DATATYPES)}) with the batch first; it returned "
                         f"{_what(y)}")
    return TensorSpec(name, datatype, tuple(y.shape[1:]))


def _torch_dtype(datatype: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, numpy_dtype(datatype))).dtype


def _what(y) -> str:
    return f"{y.dtype} of shape {list(y.shape)}" if isinstance(y, torch.Tensor) \
        else type(y).__name__


@dataclass
class Checkpoint:
    """The checkpoint to serve: its directory, step and workload's name; ``source`` is the
    --checkpoint-dir that a private copy (:func:`private_copy`) was taken from."""

    directory: Path
    step: int
    workload: str
    source: Path | None = None


def find_checkpoint(directory: str | Path) -> Checkpoint:
    """Pick the newest committed checkpoint in ``directory`` that verifies.

    Raises:
        ServeError: the directory is missing, holds nothing committed, or holds a workload
            that cannot be served.
    """
    path = Path(directory)
    if not path.is_dir():
        raise ServeError(f"--checkpoint-dir {directory} is not a directory")
    try:
        found = CheckpointReader(path).load_latest_valid()
    except CheckpointError as exc:
        raise ServeError(str(exc)) from None
    if found is None:
        committed = CheckpointReader(path).marked_steps()
        if committed:  # committed once, but none loads now: say why the newest does not
            try:
                CheckpointReader(path).load(committed[-1])
                why = "it does not verify"
            except CheckpointError as exc:
                why = str(exc)
            raise ServeError(f"none of the {len(committed)} committed checkpoints in "
                             f"--checkpoint-dir {directory} can be loaded (the newest, step "
                             f"{committed[-1]}: {why})")
        raise ServeError(f"nothing committed in --checkpoint-dir {directory}: no checkpoint "
                         "to serve (train with --checkpoint-dir and --checkpoint-every)")
    step, _, _, meta = found
    return Checkpoint(path, step, meta.workload)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # free, and pruning the original name leaves this one intact
    except OSError:  # another file system, or hard links not allowed here
        shutil.copy2(src, dst)


@contextlib.contextmanager
def private_copy(checkpoint: Checkpoint) -> Iterator[Checkpoint]:
    """The served step, hard-linked (or copied) into a private temporary directory for as
    long as the server runs: training that shares --checkpoint-dir may prune that step, and
    a replica restarted afterwards must still load it (issue 22). Removed on exit.

    Raises:
        ServeError: the step vanished before it was linked.
    """
    source = checkpoint.directory / step_dirname(checkpoint.step)
    root = Path(tempfile.mkdtemp(prefix="gradsync-serve-"))
    try:
        try:
            shutil.copytree(source, root / source.name, copy_function=_link_or_copy)
        except (OSError, shutil.Error) as exc:
            raise ServeError(f"cannot keep checkpoint step {checkpoint.step} of "
                             f"{checkpoint.directory}: {exc}") from None
        log.info("replicas load step %d from %s, a private copy: pruning it in %s does not "
                 "stop a replica from restarting", checkpoint.step, root, checkpoint.directory)
        yield Checkpoint(root, checkpoint.step, checkpoint.workload,
                         source=checkpoint.directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def load_model(checkpoint: Checkpoint) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """Build the workload's model and load the checkpoint's state into it.

    Returns:
        ``(model in eval mode, one input row's shape, logits per row)``.

    Raises:
        ServeError: the checkpoint no longer loads, or its state does not fit the workload.
    """
    model, sample = _workload_model(checkpoint)
    with torch.inference_mode():
        classes = model(torch.zeros(1, *sample.shape, dtype=sample.dtype)).shape[-1]
    return model, tuple(sample.shape), int(classes)


def _workload_model(checkpoint: Checkpoint) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the workload's model in eval mode with the checkpoint's state, one input row)."""
    from ..workloads import build_workload

    try:
        state, _, meta = CheckpointReader(checkpoint.directory).load(checkpoint.step)
    except CheckpointError as exc:
        raise ServeError(str(exc)) from None
    params = state["model"]
    hidden, dtype, seed = (_recorded(meta.settings, checkpoint.step) if meta.settings is not None
                           else _guessed(params))
    try:
        workload = build_workload(meta.workload, seed=seed, hidden=hidden, dtype=dtype)
    except ValueError as exc:  # a workload this gradsync does not know
        raise ServeError(f"checkpoint step {checkpoint.step}: {exc}") from None
    model = workload.model
    try:
        model.load_state_dict(params)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ServeError(f"checkpoint step {checkpoint.step} does not fit workload "
                         f"{meta.workload}: {first}") from None
    model.eval()
    return model, workload.eval_set[0][0]  # one row: floats, or token ids (stdlib-gpt)


def served_workload(checkpoint: Checkpoint) -> Served:
    """The checkpoint's workload model as a replica runs it: FP32 rows (or INT64 token ids)
    in, FP32 "logits" out, with their argmax as "class".

    Raises:
        ServeError: as :func:`load_model`.
    """
    model, sample = _workload_model(checkpoint)
    dtype, floats = next(model.parameters()).dtype, sample.is_floating_point()
    # Float rows cross as FP32 whatever the model's dtype (as `gradsync train` feeds it).
    input_spec = TensorSpec("input", "FP32" if floats else "INT64", tuple(sample.shape))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype) if floats else x).float()  # (n, classes) / (n, s, vocab)

    return Served(forward, input_spec, described_output(forward, input_spec, "logits"),
                  argmax=True)


def _recorded(settings: dict, step: int) -> tuple[int, torch.dtype, int]:
    """(hidden, dtype, seed) as the checkpoint's meta records them."""
    dtype = getattr(torch, str(settings.get("dtype", "float32")), None)
    hidden, seed = settings.get("hidden", 1024), settings.get("seed", 0)
    if not isinstance(dtype, torch.dtype) or type(hidden) is not int or type(seed) is not int:
        raise ServeError(f"checkpoint step {step} records settings {settings!r}: expected an "
                         "int hidden and seed and a torch dtype's name")
    return hidden, dtype, seed


def _guessed(params: dict[str, torch.Tensor]) -> tuple[int, torch.dtype, int]:
    """(hidden, dtype, seed) read back from a state whose checkpoint predates recorded
    settings: --hidden (digits-wide, synthetic-mlp) is the first layer's width, --dtype the
    state's; the seed only drew the initial weights, which the state replaces."""
    floats = [t for t in params.values() if t.is_floating_point()]
    matrices = [t for t in floats if t.dim() == 2]
    hidden = matrices[0].shape[0] if matrices else 1024
    return hidden, floats[0].dtype if floats else torch.float32, 0
