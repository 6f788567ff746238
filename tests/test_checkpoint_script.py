"""gradsync.checkpoint.Checkpointer from a user's script: a resume is bitwise equal to the run
that never stopped (model, optimizer, sampler position mid-epoch, RNG); the directory lock and
the fresh-run guard hold for scripts too. (A PS script's resume, and the CLI resuming its
checkpoint: test_ps_script.py; an All-Reduce script across processes: test_examples.py's
char_lm.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed import run_workers

BATCH, SAMPLES = 4, 40  # 2 ranks: 5 steps per epoch


def _train(directory: str, steps: int, resume: bool, every: int = 3):
    """A DDP-style script with dropout (so the RNG matters) and checkpoints."""
    import gradsync
    from gradsync.checkpoint import Checkpointer
    from gradsync.data import ShardedSampler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Linear(16, 2)).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(SAMPLES, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 2, (SAMPLES,), generator=g))
    sampler = ShardedSampler(data, shuffle=True, seed=3)
    # Its own generator: else each epoch's iteration draws a seed from torch's stream, one
    # more draw in a run resumed mid-epoch than in one that never stopped (dropout differs).
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Checkpointer(directory, model, opt, sampler=sampler, batch_size=BATCH,
                      every=every) as ckpt:
        step = start = ckpt.start(resume=resume)
        epoch = ckpt.epoch
        net = gradsync.DataParallel(model)
        while step < steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                step += 1
                ckpt.step(step)
                if step >= steps:
                    break
            epoch += 1
    return start, epoch, [p.detach().clone() for p in model.parameters()]


def _straight_and_resumed(rank: int, world: int, tmp: str):
    straight = _train(f"{tmp}/a", 12, resume=False)[2]
    _train(f"{tmp}/b", 7, resume=False)  # saves steps 3 and 6; step 7 is lost
    start, _, resumed = _train(f"{tmp}/b", 12, resume=True)
    return start, all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.timeout(120)
def test_a_script_resumes_mid_epoch_bitwise(tmp_path: Path):
    """Stopped at step 7 of 12, resumed from the checkpoint of step 6 (epoch 1, 4 samples in
    on each rank): the parameters equal those of the run that never stopped."""
    assert run_workers(_straight_and_resumed, 2, str(tmp_path)) == [(6, True), (6, True)]


def _guard_and_lock(rank: int, world: int, directory: str):
    from gradsync.checkpoint import (CheckpointError, CheckpointRefusedError, Checkpointer,
                                     CheckpointReader)

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def refusal(resume=False, overwrite=False) -> str:
        ckpt = Checkpointer(directory, model, opt, every=1)
        try:
            ckpt.start(resume=resume, overwrite=overwrite)
        except CheckpointRefusedError:
            return "refused by rank 0"
        except CheckpointError as exc:
            return str(exc)
        finally:
            ckpt.close()
        return "started"

    first = Checkpointer(directory, model, opt, every=1)
    assert first.start() == 0 and first.step(1)
    locked = refusal(resume=True)  # the first still holds the directory
    first.close()
    fresh = refusal()
    overwritten = refusal(overwrite=True)
    return locked, fresh, overwritten, CheckpointReader(directory).committed_steps()


@pytest.mark.timeout(120)
def test_the_lock_and_the_fresh_run_guard_hold_for_scripts(tmp_path: Path):
    ranks = run_workers(_guard_and_lock, 2, str(tmp_path / "ck"))
    locked, fresh, overwritten, left = ranks[0]
    assert "lock" in locked
    assert "already holds committed checkpoints (steps 1)" in fresh and "--resume" in fresh
    assert overwritten == "started" and left == []
    assert ranks[1][:3] == ("refused by rank 0", "refused by rank 0", "started")


def test_the_trainers_loaders_leave_the_global_rng_alone():
    """`gradsync train`'s loaders draw their base seed from a generator of their own: from
    torch's global one, a run resumed mid-epoch (one more iteration than the straight run)
    would shift dropout's stream and no longer equal it bit for bit."""
    from gradsync.data import ShardedSampler
    from gradsync.train.loop import loader_of

    data = TensorDataset(torch.arange(10.0))
    before = torch.get_rng_state()
    for _ in loader_of(data, 4, ShardedSampler(data, 1, 0, shuffle=True, seed=0)):
        pass
    assert torch.equal(torch.get_rng_state(), before)
    for _ in DataLoader(data, batch_size=4):  # the oracle: a plain loader does draw
        pass
    assert not torch.equal(torch.get_rng_state(), before)
