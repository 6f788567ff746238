"""Torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) as bench_zero's peer: the same MLP
and optimizer, on the same gloo process group that gradsync started (its default group).

Wrapped as FSDP2's documentation does: each Linear is a ``fully_shard`` unit, then the
root, over a 1-D CPU device mesh of all ranks; parameters, gradients and Adam's state are
DTensors sharded on dim 0 (stage 3 in ZeRO's terms, ``reshard_after_forward=True``).
"""

from __future__ import annotations

NAME = "fsdp2"


def build_fsdp2(hidden: int, layers: int):
    """(FSDP2 model, torch.optim.Adam over its sharded parameters); collective. Same seed
    and architecture as bench_zero's other variants (gradsync.comm.reference.torch_fsdp2)."""
    import torch

    from gradsync.comm.reference import torch_fsdp2
    from gradsync.models import MLP

    torch.manual_seed(0)
    model = torch_fsdp2(MLP(784, [hidden] * layers, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def full_parameters(model) -> list:
    """Whole parameters (collective: an all-gather per parameter)."""
    return [p.full_tensor().detach() for p in model.parameters()]


def fsdp2_gradient_scale(rank: int, size: int) -> dict:
    """Are FSDP2's gradients on gloo the average over ranks or their sum? Each rank runs
    backward of a mean-reduced loss on its slice of one global batch (float64, a small
    MLP); the whole gradients are compared with one process's on the global batch, where
    an average gives ratio 1 and a sum ratio ``size``. Collective."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()

    ref, model = make(), make()
    mesh = init_device_mesh("cpu", (size,))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8 * size, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(8 * size, 4, generator=gen, dtype=torch.float64)
    F.mse_loss(ref(x), y).backward()
    F.mse_loss(model(x[8 * rank:8 * (rank + 1)]), y[8 * rank:8 * (rank + 1)]).backward()
    got = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    ratio = (got / want)[want.abs() > 1e-12]
    return {"ratio_median": ratio.median().item(), "ratio_min": ratio.min().item(),
            "ratio_max": ratio.max().item(), "world": size,
            "max_abs_diff_vs_average": (got - want).abs().max().item()}
