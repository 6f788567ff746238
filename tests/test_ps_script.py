"""The Parameter Server from a user's script (gradsync/ps/script.py): the same training as one
process on the global batch, the same parameters as `gradsync train --arch ps` to the bit,
and the roles and refusals a script meets.

The end-to-end runs start tests/scripts/ckpt_digits.py under gradsync's launcher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers
from tests.helpers import (BATCH, OPTIMIZERS, STEPS, global_batch, gradsync, make_model,
                           retry_finalize_abort, run_script)
from tests.helpers import one_process_reference as reference


def _train_through_the_api(rank: int, world: int, optimizer: str):
    import gradsync.ps
    from gradsync import comm

    ps = gradsync.ps.init(servers=1)
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    roles = (ps.is_server, ps.is_worker, ps.worker_rank, ps.num_workers, ps.server_ranks)
    if ps.is_server:
        with pytest.raises(RuntimeError, match="server rank"):
            ps.DistributedOptimizer(opt, model)
        ps.serve(model, opt)
        return roles, None, ps.worker_group, ps.shutdown()
    with pytest.raises(RuntimeError, match="worker rank"):
        ps.serve(model, opt)
    two_groups = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="one parameter group, not 6"):
        ps.DistributedOptimizer(two_groups, model)
    with ps:
        opt = ps.DistributedOptimizer(opt, model)
        for step in range(STEPS):
            x, y = global_batch(step, ps.num_workers * BATCH)
            shard = slice(ps.worker_rank * BATCH, (ps.worker_rank + 1) * BATCH)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
            opt.step()
    # the workers' own group: rank and size among the workers
    ones = torch.ones(1)
    comm.all_reduce(ones, group=ps.worker_group)
    group = (ps.worker_group.rank, ps.worker_group.size, int(ones.item()))
    assert opt.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"]
    return roles, [p.detach().numpy().copy() for p in model.parameters()], group, \
        ps.shutdown()["server_updates"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_script_trains_as_one_process_on_the_global_batch(optimizer):
    """Sync PS from the script API equals SGD/Adam on the global batch of 2 workers; the
    roles, the workers' group and the refusals a script meets."""
    results = run_workers(_train_through_the_api, 3, optimizer)
    assert [r[0] for r in results] == [(True, False, -1, 2, [0]), (False, True, 0, 2, [0]),
                                       (False, True, 1, 2, [0])]
    assert results[0][2] is None and results[0][3] == {}  # a server has no worker group
    assert [r[2] for r in results[1:]] == [(0, 2, 2), (1, 2, 2)]
    assert results[1][3] == [STEPS]
    for got in (results[1][1], results[2][1]):
        for g, ref in zip(got, reference(2, optimizer)):
            np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-13)


def _refused_options(rank: int, world: int):
    import gradsync.ps

    messages = []
    for kwargs in ({"servers": 2}, {"consistency": "bsp"}, {"compression": "powersgd:2"}):
        with pytest.raises(ValueError) as info:
            gradsync.ps.init(**kwargs)
        messages.append(str(info.value))
    return messages


@pytest.mark.timeout(60)
def test_bad_options_are_refused_on_every_rank():
    messages = run_workers(_refused_options, 2)[0]
    assert "leaves no worker" in messages[0]
    assert "bsp" in messages[1] and "powersgd" in messages[2]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_script_ends_with_the_clis_parameters_bit_for_bit(tmp_path: Path):
    """The same workload, seeds and data order as `gradsync train --arch ps` (20 steps), run
    by a script in two halves, 10 steps then a resume from its checkpoint at step 10: the
    same digest, accuracy and Parameter-Server layout as the CLI's straight run. The CLI
    resumes the script's checkpoint (the same format) to the same digest too."""
    cli = gradsync("train", "--arch", "ps", "--servers", "1", "--workers", "2", "--workload",
                   "digits-mlp", "--steps", "20", "--no-progress", "--out",
                   str(tmp_path / "cli"))
    assert cli.returncode == 0, cli.stderr[-3000:]
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--every", "5"]
    assert run_script(3, "--arch", "ps", "--steps", "10", *ck, "--out",
                      str(tmp_path / "half.json")).returncode == 0
    shutil.copytree(tmp_path / "ck", tmp_path / "ck-cli")
    # Retried once on gloo's finalize abort (helpers.py), which comes after the run has
    # written its checkpoints: the retry resumes from the last one and repeats no step.
    assert retry_finalize_abort(lambda: run_script(
        3, "--arch", "ps", "--steps", "20", *ck, "--resume", "--out",
        str(tmp_path / "script.json"))).returncode == 0
    ours = json.loads((tmp_path / "script.json").read_text())
    assert ours["parameters_sha1"] == summary["parameters_sha1"]
    assert ours["eval_accuracy"] == summary["eval_accuracy"]  # the workers' group evaluates
    for key in ("servers", "consistency", "partitions_per_server"):
        assert ours["ps"][key] == summary[key], key
    assert ours["ps"]["server_updates"] == [10]  # one sync update per step after the resume
    resumed = gradsync("train", "--arch", "ps", "--servers", "1", "--workers", "2",
                       "--workload", "digits-mlp", "--steps", "20", "--checkpoint-dir",
                       str(tmp_path / "ck-cli"), "--checkpoint-every", "5", "--resume",
                       "--no-progress", "--out", str(tmp_path / "cli-resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "cli-resumed" / "summary.json").read_text())[
        "parameters_sha1"] == summary["parameters_sha1"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [("async", "0"), ("ssp", "1")])
def test_async_and_ssp_scripts_train_and_end_cleanly(tmp_path: Path, mode):
    consistency, staleness = mode
    out = tmp_path / "out.json"
    # a fresh run each time: retried once if gloo aborts a finished rank (helpers.py)
    assert retry_finalize_abort(lambda: run_script(
        3, "--arch", "ps", "--steps", "40", "--consistency", consistency, "--staleness",
        staleness, "--out", str(out))).returncode == 0
    ours = json.loads(out.read_text())
    assert ours["steps"] == 40 and ours["ps"]["consistency"] == consistency
    assert ours["ps"]["server_updates"] == [80]  # every worker's push of every step
    # 10 classes, chance 0.1; 40 asynchronous steps reach 0.59-0.7 (the order of the
    # pushes, so the result, depends on the scheduling)
    assert ours["eval_accuracy"] > 0.4, ours
