"""The rank side of `gradsync bench memory`: one variant built, a few steps, its memory measured.

Each rank builds the MLP 784-H-...-H-10 under one variant, takes ``steps`` steps of float32
Adam on random data and reports two figures, gathered to rank 0:

- model state after the last step (:func:`model_state_bytes`: the distinct storages behind
  parameters, gradients and optimizer state, each counted once);
- the peak resident memory during the steps above the process's memory before the model
  was built: VmHWM (reset through /proc/self/clear_refs after the baseline) minus that
  baseline VmRSS. It is model state plus activations, the collectives' staging, stage 2's
  bucket while it fills, stage 3's gathered layers and the allocator's slack.

Every variant runs ``algorithm="native"`` (the engine's collectives): on one host the
default puts buckets in shared-memory segments whose pages every rank maps, which a
per-process peak counts once per rank that touches them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

VARIANTS = ("dp", "zero-1", "zero-2", "zero-3")
PEER = "fsdp2"  # torch's fully_shard on the same gloo group (gradsync.comm.reference)


def build(variant: str, hidden: int, layers: int):
    """(wrapped model, optimizer) of ``variant``, seed 0 on every rank; collective."""
    import torch

    import gradsync
    from gradsync.models import MLP

    torch.manual_seed(0)
    model = MLP(784, [hidden] * layers, 10)
    if variant == PEER:
        from gradsync.comm.reference import torch_fsdp2

        model = torch_fsdp2(model)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    if variant == "dp":
        dp = gradsync.DataParallel(model, algorithm="native")
        return dp, torch.optim.Adam(dp.parameters(), lr=1e-3)
    sdp = gradsync.ShardedDataParallel(model, torch.optim.Adam, stage=int(variant[-1]),
                                       lr=1e-3, algorithm="native")
    return sdp, sdp.optimizer


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensor: this rank's shard


def model_state_bytes(model, opt) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state: the distinct storages
    behind them, each counted once, in the first category that reaches it (stage 3: its
    (k,) shards; FSDP2: its DTensors' local shards)."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in map(_local, tensors):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return total

    buckets = getattr(model, "buckets", [])
    inner = getattr(model, "module", model)
    # Stage 3's parameter values live in its shards; stages 1-2's pieces share the flat
    # buckets' storage, counted once.
    params = list(inner.parameters()) + [b.shard for b in buckets if b.shard is not None]
    pieces = [b.piece for b in buckets if b.piece is not None]
    grads = [t.grad for t in params + pieces if t.grad is not None]
    state = [v for s in opt.state.values() for v in s.values()
             if hasattr(v, "untyped_storage") and v.dim() > 0]
    return {"params": count(params), "grads": count(grads), "optimizer": count(state)}


def n_params(model) -> int:
    """Parameters of the whole model, counted from the buckets for stages 1-3 (stage 3's
    state_dict() would gather the whole model on every rank, which the peak would count)."""
    if hasattr(model, "buckets"):
        return sum(b.numel for b in model.buckets)
    return sum(p.numel() for p in model.parameters())  # FSDP2's DTensors: the global numel


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _warm_up(x, y) -> None:
    """One step of a tiny local model first: torch's lazily made kernels, thread pools and
    allocator caches then belong to the baseline, not to the variant's peak."""
    import torch
    import torch.nn.functional as F

    from gradsync.models import MLP

    tiny = MLP(784, [16], 10)
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-3)
    F.cross_entropy(tiny(x), y).backward()
    opt.step()


def run_rank(variant: str, hidden: int, layers: int, batch: int, steps: int,
             result_file: str) -> None:
    """Measure ``variant`` on this rank; rank 0 writes every rank's figures to
    ``result_file``: ``{"n_params", "per_rank": [[peak, params, grads, optimizer], ...]}``.
    Ends the process (status 0) once written."""
    import torch
    import torch.nn.functional as F

    from gradsync import comm

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=600)
    gen = torch.Generator().manual_seed(1000 + group.rank)
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    _warm_up(x, y)
    comm.barrier()
    base_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    model, opt = build(variant, hidden, layers)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    peak = (_status_kib("VmHWM") - base_kib) * 1024
    # (4,) this rank's peak and model state, float64; gathered: every rank's.
    mine = torch.tensor([peak, *model_state_bytes(model, opt).values()], dtype=torch.float64)
    rows = [torch.empty_like(mine) for _ in range(group.size)]
    comm.all_gather(rows, mine, algorithm="native")
    if group.rank == 0:
        Path(result_file).write_text(json.dumps(
            {"n_params": n_params(model), "per_rank": [r.tolist() for r in rows]}))
    comm.destroy_process_group()
    # Leave without the interpreter's finalization, as gradsync train's ranks do
    # (cli._exit_rank): torch 2.13's gloo can abort a finished process there ("terminate
    # called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
