"""Elastic training from a user's script (gradsync.elastic: State and the run decorator),
started by gradsync.train.elastic_run.launch as `gradsync run --elastic` starts it.

The oracle is the one of tests/test_elastic.py: with the global batch kept, the run equals
SGD on the same global batches in one process, whatever the membership.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsync.comm.elastic import ElasticWorld
from gradsync.data.sampler import ElasticOrder
from tests.distributed import scaled
from tests.helpers import alive, one_line_error

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "elastic_state.py"
LAUNCH = """\
import sys
from gradsync.train.elastic_run import launch
sys.exit(launch([sys.executable, sys.argv[1], sys.argv[2]], int(sys.argv[3]),
                min_workers=int(sys.argv[4]), max_restarts=int(sys.argv[5]),
                timeout_s=float(sys.argv[6])))
"""


def _script():
    spec = importlib.util.spec_from_file_location("elastic_state_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracle(script) -> tuple[list[torch.Tensor], int]:
    """One process, SGD on the global batches (BATCH * WORKERS) of ElasticOrder for the
    script's epochs; the parameters and the step count."""
    model, x, y = script.build()
    opt = script.make_optimizer(model.parameters())
    order, steps = ElasticOrder(script.N, seed=0), 0
    for epoch in range(script.EPOCHS):
        indices = order.epoch_indices(epoch)
        for start in range(0, script.N, script.BATCH * script.WORKERS):
            chunk = indices[start:start + script.BATCH * script.WORKERS]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[chunk]), y[chunk]).backward()
            opt.step()
            steps += 1
    return [p.detach() for p in model.parameters()], steps


def _launch(out: Path, workers: int, min_workers: int, max_restarts: int,
            env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "TORCH_CPP_LOG_LEVEL": "ERROR", "GRADSYNC_TIMEOUT": str(scaled(60)), **env}
    return subprocess.run([sys.executable, "-c", LAUNCH, str(SCRIPT), str(out), str(workers),
                           str(min_workers), str(max_restarts), str(scaled(60))],
                          env=environ, capture_output=True, text=True, timeout=scaled(150))


def _left_behind(out: Path) -> list[int]:
    """The workers (each wrote its pid at start) still alive."""
    return [pid for pid in (int(p.read_text()) for p in out.glob("pid-*")) if alive(pid)]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_script_loses_a_worker_takes_a_replacement_and_equals_sgd(tmp_path: Path):
    # 3 workers, global batch 12 (107 samples: 9 steps an epoch, the last of 11 samples, cut
    # 6/5 or 4/4/3, so the weights count); member 1 SIGKILLed as it starts step 3, the
    # survivors redo step 3 with shares of 6; a replacement (member 3) joins at step 7 (the
    # members wait there for it) and takes the state by broadcast, the value kept with the
    # state too.
    script = _script()
    proc = _launch(tmp_path, script.WORKERS, 2, 1,
                   {"GRADSYNC_ELASTIC_KILL": "1@3", "GRADSYNC_ELASTIC_AWAIT": "7"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "worker 1 killed by SIGKILL; the others go on" in proc.stderr, proc.stderr
    assert "elastic: generation 1: member 1 left at step 3; 2 workers" in proc.stderr
    assert "elastic: generation 2: member 3 joined at step 7; 3 workers" in proc.stderr
    want, steps = _oracle(script)
    results = {int(p.name[7:-5]): json.loads(p.read_text()) for p in tmp_path.glob("result-*")}
    assert sorted(results) == [0, 2, 3]
    for uid, got in results.items():
        assert (got["step"], got["epoch"], got["commits"], got["members"]) == \
            (steps, script.EPOCHS, steps, [0, 2, 3]), (uid, got)
        for p, w in zip(got["params"], want):
            torch.testing.assert_close(torch.tensor(p, dtype=torch.float64), w,
                                       rtol=1e-12, atol=1e-13)
    assert [(c["generation"], c["left"], c["joined"], c["step"], c["workers"])
            for c in results[0]["changes"]] == [(1, [1], [], 3, 2), (2, [], [3], 7, 3)]
    assert _left_behind(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_script_below_min_workers_stops_with_the_usual_line(tmp_path: Path):
    proc = _launch(tmp_path, 2, 2, 0, {"GRADSYNC_ELASTIC_KILL": "1@2"})
    assert proc.returncode == 128 + 9, (proc.returncode, proc.stderr)
    assert "gradsync: worker rank 1 killed by SIGKILL; 1 worker(s) left, fewer than " \
        "--min-workers 2: stopping the other workers" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("result-*"))
    assert _left_behind(tmp_path) == []


@pytest.mark.timeout(60)
def test_script_outside_an_elastic_launcher_is_one_line(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSYNC_ELASTIC")}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                          text=True, timeout=scaled(60), env={**env, "PYTHONPATH": str(REPO)})
    one_line_error(proc, "gradsync.elastic.init() needs gradsync's elastic launcher",
                   "gradsync run --elastic")


@pytest.mark.parametrize("kwargs,message", [
    ({"rescale": "sgd"}, "rescale must be 'batch' or 'lr', got 'sgd'"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"check_every": 0}, "check_every must be at least 1, got 0"),
    ({"best": "high"}, "values kept with the state must be numbers: best"),
    ({"epoch": 3}, "epoch: a name of State itself, not a value"),
    ({"rank": 0, "order": 1}, "order, rank: a name of State itself, not a value"),
])
def test_state_refuses_bad_arguments(kwargs: dict, message: str):
    from gradsync.elastic import State

    world = ElasticWorld(store=None, uid=0, timeout_s=1.0)
    model = torch.nn.Linear(2, 1)
    args = {"dataset_len": 10, "batch_size": 2, "initial_workers": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        State(world, model, lambda p: torch.optim.SGD(p, lr=0.1), **args)
