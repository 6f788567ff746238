"""`gradsync serve` builds the model a checkpoint holds from the workload settings it
recorded (CheckpointMeta.settings), and from its shapes for checkpoints written before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gradsync.workloads as gradsync_workloads

pytestmark = pytest.mark.timeout(120)


def _bottleneck(*, seed: int, hidden: int, dtype: torch.dtype):
    """A workload whose --hidden cannot be read back from its state: the first layer is 8
    wide whatever --hidden says, the second is --hidden wide."""
    from torch.utils.data import TensorDataset

    from gradsync.models import MLP
    from gradsync.workloads import Workload, cross_entropy_loss

    torch.manual_seed(seed)
    data = TensorDataset(torch.zeros(4, 64, dtype=dtype), torch.zeros(4, dtype=torch.int64))
    return Workload("test-bottleneck", MLP(64, [8, hidden], 10).to(dtype), data, data,
                    cross_entropy_loss, "accuracy", 0.1, 1, 4, "sgd")


def _commit(directory: Path, name: str, model: torch.nn.Module, settings: dict | None) -> None:
    from gradsync.checkpoint import CheckpointManager, CheckpointMeta, model_fingerprint

    meta = CheckpointMeta(7, 0, name, 1, "local", model_fingerprint(model), settings)
    CheckpointManager(directory).save(7, {"model": model.state_dict()}, meta)


def test_served_model_is_built_with_the_recorded_settings(tmp_path, monkeypatch):
    from gradsync.serve.model import ServeError, find_checkpoint, load_model

    monkeypatch.setitem(gradsync_workloads.WORKLOADS, "test-bottleneck", _bottleneck)
    trained = _bottleneck(seed=3, hidden=24, dtype=torch.float64).model
    settings = {"workload": "test-bottleneck", "hidden": 24, "dtype": "float64", "seed": 3}
    _commit(tmp_path / "new", "test-bottleneck", trained, settings)
    model, input_shape, classes = load_model(find_checkpoint(tmp_path / "new"))
    x = torch.randn(5, 64, dtype=torch.float64)
    assert (input_shape, classes) == ((64,), 10)
    with torch.inference_mode():
        assert torch.equal(model(x), trained.eval()(x))
    # Without the settings, the shapes say --hidden 8: that model does not fit the state.
    _commit(tmp_path / "old", "test-bottleneck", trained, None)
    with pytest.raises(ServeError, match="does not fit workload test-bottleneck"):
        load_model(find_checkpoint(tmp_path / "old"))


def test_checkpoint_without_settings_still_served_from_its_shapes(tmp_path):
    from gradsync.serve.model import find_checkpoint, load_model

    trained = gradsync_workloads.build_workload("digits-wide", hidden=32,
                                                dtype=torch.float64).model
    _commit(tmp_path, "digits-wide", trained, None)  # as written before settings were recorded
    model, input_shape, classes = load_model(find_checkpoint(tmp_path))
    assert next(model.parameters()).dtype == torch.float64
    assert (input_shape, classes) == ((64,), 10)
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(model(x), trained.eval()(x))
