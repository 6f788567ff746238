"""The engine's own data parallelism, as a baseline to measure gradsync against.

Only this package may import torch.distributed, so the benchmarks reach
``torch.nn.parallel.DistributedDataParallel`` and its built-in comm hooks through here.
"""

from __future__ import annotations

from torch import nn

from .group import Group, resolve

# --compression specs that torch's own DDP hooks implement (``--arch ddp`` baselines).
TORCH_HOOKS = ("fp16", "bf16", "powersgd")


def torch_ddp(module: nn.Module, group: Group | None = None, bucket_cap_mb: float = 25.0,
              compression: str = "none", powersgd_start_iter: int = 2) -> nn.Module:
    """Wrap ``module`` in torch's DistributedDataParallel over ``group``'s process group,
    with torch's own hook for ``compression`` ("fp16", "bf16", "powersgd:RANK"; torch's
    ``powerSGD_hook`` with error feedback and warm start from ``powersgd_start_iter``)."""
    from torch.nn.parallel import DistributedDataParallel

    pg = resolve(group).pg
    ddp = DistributedDataParallel(module, process_group=pg, bucket_cap_mb=bucket_cap_mb)
    name, _, arg = compression.partition(":")
    if name in ("fp16", "bf16"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.fp16_compress_hook if name == "fp16" else \
            default_hooks.bf16_compress_hook
        ddp.register_comm_hook(pg, hook)
    elif name == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(process_group=pg, matrix_approximation_rank=int(arg),
                                   start_powerSGD_iter=powersgd_start_iter)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    elif name != "none":
        raise ValueError(f"torch's DDP has no built-in hook for --compression {compression}; "
                         f"it offers {', '.join(TORCH_HOOKS)}")
    return ddp


def torch_fsdp2(module: nn.Module, group: Group | None = None) -> nn.Module:
    """Shard ``module`` with torch's FSDP2 (``fully_shard``) over ``group``'s ranks, as its
    documentation wraps a model: each ``nn.Linear`` a unit, then the root, on a 1-D CPU
    device mesh (the default process group's, which must be ``group``'s); parameters,
    gradients and optimizer state become DTensors sharded on dim 0 (ZeRO stage 3)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    size = resolve(group).size
    if size != dist.get_world_size():
        raise ValueError("torch_fsdp2 shards over the default process group's ranks only")
    mesh = init_device_mesh("cpu", (size,))
    for m in module.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module
