"""auto_data_parallel (DataParallel with the planner's strategy): every rank gets rank 0's
choice, rank 0 alone says it in one line, and the result trains exactly as the
DataParallel a script would have configured by hand with that choice."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from gradsync.allreduce.auto import Strategy
from tests.distributed import run_checks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _train(model, rank: int, steps: int = 3) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _auto_equals_by_hand(rank, world, compression):
    from gradsync import DataParallel
    from gradsync.allreduce.auto import auto_data_parallel
    from gradsync.compress.spec import make_hook

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("gradsync.allreduce.auto")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Each rank's own sample: only rank 0's is measured, and its choice is everyone's.
        auto = auto_data_parallel(_model(), _batch(rank, 99), nn.functional.cross_entropy,
                                  compression=compression)
    finally:
        logger.removeHandler(handler)
    s = auto.strategy
    by_hand = DataParallel(_model(), algorithm=s.algorithm, bucket_cap_mb=s.bucket_cap_mb)
    hook = make_hook(s.compression, algorithm=s.algorithm)
    if hook is not None:
        by_hand.register_comm_hook(*hook)
    same = all(torch.equal(a, b) for a, b in zip(_train(auto, rank), _train(by_hand, rank)))
    return s.encode().tolist(), lines, same, s.compression


@pytest.mark.timeout(120)
def test_auto_picks_one_strategy_says_it_once_and_trains_like_its_hand_written_twin():
    results = run_checks([("any", _auto_equals_by_hand, (None,)),
                          ("topk", _auto_equals_by_hand, ("topk:0.01",))], 2, timeout=100)
    for name in ("any", "topk"):
        (head0, lines0, same0, _), (head1, lines1, same1, codec) = results[name]
        # The broadcast choice, alike on both ranks (NaN: no runner-up).
        assert torch.equal(torch.tensor(head0).nan_to_num(), torch.tensor(head1).nan_to_num())
        assert head0[0] == 1.0
        assert same0 and same1
        assert len(lines0) == 1 and lines1 == []
        assert 'DataParallel(strategy="auto") chose allreduce' in lines0[0]
        assert "ms/step predicted" in lines0[0]
    assert "runner-up" in results["any"][0][1][0]
    assert results["topk"][1][3] == "topk:0.01"  # only top-k allowed; one candidate


def test_strategy_crosses_as_a_fixed_layout_tensor():
    for spec in ("none", "fp16", "bf16", "topk:0.01", "powersgd:2"):
        s = Strategy("ring", spec, 4.0, 12.5, math.nan)
        header = s.encode()
        assert header.dtype == torch.float64 and header.shape == (7,)
        back = Strategy.decode(header)
        assert (back.algorithm, back.compression, back.bucket_cap_mb, back.predicted_ms) == \
            ("ring", spec, 4.0, 12.5)
