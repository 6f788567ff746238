"""The Parameter-Server architecture: sync equals one process on the global batch; async and
ssp train and keep their bounds; malformed messages and lost peers give named errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers
from tests.test_data_parallel import BATCH, STEPS, global_batch, make_model

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def reference(workers: int, optimizer: str):
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    for step in range(STEPS):
        x, y = global_batch(step, workers * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def _ps_train(rank, world, servers, optimizer, consistency, staleness, model_fn=None,
              steps=STEPS, slow_worker=None):
    from gradsync import comm
    from gradsync.ps import PSArchitecture

    arch = PSArchitecture(servers, consistency, staleness, comm.world())
    model = (model_fn or make_model)()
    if not arch.is_worker:
        stats = arch.serve(model, OPTIMIZERS[optimizer])
        return ("server", stats)
    ps_model, opt = arch.prepare(model, OPTIMIZERS[optimizer])
    n, w = arch.num_workers, arch.worker_rank
    for step in range(steps):
        x, y = global_batch(step, n * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                               y[w * BATCH:(w + 1) * BATCH]).backward()
        if slow_worker == w:
            # A slow worker: extra compute per step, not a sleep.
            a = torch.randn(300, 300, dtype=torch.float64)
            for _ in range(20):
                a = torch.tanh(a @ a)
        opt.step()
    summary = arch.finish()
    return ("worker", [p.detach().numpy().copy() for p in model.parameters()], summary)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_matches_single_process_for_every_k_and_n(optimizer):
    for servers in (1, 2, 3):
        for workers in (1, 2, 3):
            results = run_workers(_ps_train, servers + workers, servers, optimizer, "sync", 0)
            want = reference(workers, optimizer)
            for result in results[servers:]:
                for got, ref in zip(result[1], want):
                    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13,
                                               err_msg=f"K={servers} N={workers}")
            assert results[servers][2]["max_staleness"] == 0
