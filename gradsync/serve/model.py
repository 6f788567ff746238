"""The served model: the newest committed checkpoint of a `gradsync train` run, its workload's
model, in eval mode.

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
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.format import MARKER, STEP_DIR_RE, CheckpointError, step_dirname
from ..checkpoint.reader import CheckpointReader

log = logging.getLogger(__name__)

# Workloads whose input is not a float tensor (token ids) are not served.
UNSERVED = {"stdlib-gpt": "it takes token ids, and the server takes FP32 rows"}


class ServeError(Exception):
    """Nothing can be served (no committed checkpoint, an unservable workload): one line."""


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
        committed = sorted(int(m.group(1)) for entry in path.iterdir()
                           if (m := STEP_DIR_RE.match(entry.name)) and not m.group(2)
                           and (entry / MARKER).exists())
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
    if meta.workload in UNSERVED:
        raise ServeError(f"cannot serve {meta.workload}: {UNSERVED[meta.workload]}")
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
    input_shape = tuple(workload.eval_set[0][0].shape)
    with torch.inference_mode():
        classes = model(torch.zeros(1, *input_shape, dtype=dtype)).shape[-1]
    return model, input_shape, int(classes)


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
