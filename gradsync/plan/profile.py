"""Measure once, locally: what one worker's step costs without any communication.

A :class:`Profile` holds, for a workload and a batch per worker, the medians over a few
steps of one process (one thread, as each rank of a run has on a shared machine):

- ``data_s``, ``forward_s``, ``backward_s``, ``optimizer_s``: the phases of a step;
- ``grads``: for each parameter, in the order backward produces its gradient, the seconds
  from the start of backward to that moment and the gradient's bytes (what a bucket or a
  partition waits for before it can be sent);
- ``codecs``: per compressor, the seconds to compress and decompress one step's gradients
  and the fraction of the dense bytes that crosses the wire.

Nothing here communicates; the predictions (predict.py) add the network.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import default_collate

from ..comm.calibrate import median_time

# The compressors whose cost is measured, as `--compression` spells them.
CODECS = ("fp16", "bf16", "topk:0.01", "powersgd:2")


@dataclass
class Profile:
    workload: str
    batch: int
    """Samples per worker per step."""
    forward_s: float
    backward_s: float
    optimizer_s: float
    data_s: float
    """Collating one batch from the dataset, as the trainer does each step."""
    grads: list[tuple[float, int]]
    """(seconds after backward starts, bytes) per parameter, in the order they become ready."""
    codecs: dict[str, tuple[float, float]] = field(default_factory=dict)
    hidden: int = 1024
    """The workload's width (synthetic-mlp, digits-wide)."""
    """compression spec -> (seconds per step to encode and decode, wire bytes / dense bytes)."""

    @property
    def grad_bytes(self) -> int:
        return sum(b for _, b in self.grads)

    @property
    def compute_s(self) -> float:
        return self.data_s + self.forward_s + self.backward_s + self.optimizer_s

    def chunks(self, cap_bytes: float) -> list[tuple[float, int]]:
        """The gradients cut into consecutive chunks of at most ``cap_bytes`` (a parameter
        never split, as DDP's buckets): (ready time of its last parameter, bytes) each."""
        out: list[tuple[float, int]] = []
        ready, size = 0.0, 0
        for t, b in self.grads:
            if size and size + b > cap_bytes:
                out.append((ready, size))
                size = 0
            ready, size = t, size + b
        if size:
            out.append((ready, size))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        raw["grads"] = [tuple(g) for g in raw["grads"]]
        raw["codecs"] = {k: tuple(v) for k, v in raw.get("codecs", {}).items()}
        return cls(**raw)


def measure(workload: str, batch: int | None = None, *, steps: int = 12, seed: int = 0,
            hidden: int = 1024, specs: tuple[str, ...] = CODECS) -> Profile:
    """Time ``steps`` steps of ``workload`` (after two warm-up steps) in this process, one
    thread; the medians of each phase, and the cost of each compressor in ``specs``."""
    from ..train.loop import make_optimizer
    from ..workloads import build_workload

    torch.set_num_threads(1)
    w = build_workload(workload, seed=seed, hidden=hidden)
    batch = batch or w.default_batch_size
    model = w.model
    optimizer = make_optimizer(w.optimizer, model.parameters(), w.default_lr)
    def collate():
        return default_collate([w.train_set[i % len(w.train_set)] for i in range(batch)])

    x, y = collate()
    params = [p for p in model.parameters() if p.requires_grad]
    ready: dict[int, float] = {}
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(
            lambda _p, i=i: ready.__setitem__(i, time.perf_counter()))
    phases: list[tuple[float, float, float]] = []
    offsets: list[list[float]] = []
    for step in range(steps + 2):
        optimizer.zero_grad(set_to_none=True)
        ready.clear()
        t0 = time.perf_counter()
        loss = w.loss_fn(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step >= 2:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
            offsets.append([ready.get(i, t2) - t1 for i in range(len(params))])
    order = sorted(range(len(params)), key=lambda i: statistics.median(o[i] for o in offsets))
    grads = [(statistics.median(o[i] for o in offsets),
              params[i].numel() * params[i].element_size()) for i in order]
    med = [statistics.median(p[k] for p in phases) for k in range(3)]

    def step(m: torch.nn.Module) -> None:
        w.loss_fn(m(x), y).backward()

    return Profile(workload, batch, *med, median_time(collate, steps), grads,
                   codecs(model, step, steps, specs), hidden)


def codecs(model: torch.nn.Module, step: Callable[[torch.nn.Module], None], repeat: int,
           specs: tuple[str, ...] = CODECS) -> dict[str, tuple[float, float]]:
    """Per compressor of ``specs``: (seconds a step spends in it, wire fraction). Each
    is timed through gradsync's own hook on a one-rank world (its collectives move nothing,
    its encoding and decoding run as in a run), as the step time of the wrapped model minus
    that of the plain wrapped model. The wire fraction is each format's arithmetic on one
    bucket of every gradient: halves 0.5; top-k its k values and int64 indices; PowerSGD
    r (n + m) for each matrix its hook compresses, the rest dense."""
    from .. import comm
    from ..allreduce import DataParallel
    from ..compress.powersgd import split_matrices
    from ..compress.spec import make_hook
    from ..compress.topk import INDEX_BYTES
    from ..launcher import find_free_port

    if not specs:
        return {}
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    size = params[0].element_size()
    group = comm.init_process_group("gloo", rank=0, world_size=1, master_addr="127.0.0.1",
                                    master_port=find_free_port())
    try:
        def timed(spec: str | None) -> tuple[float, object]:
            dp = DataParallel(copy.deepcopy(model), group=group, topology=None)
            hook = make_hook(spec, group) if spec else None
            if hook is not None:
                dp.register_comm_hook(*hook)
            return median_time(lambda: step(dp), repeat), hook and hook[0]

        base, _ = timed(None)
        out = {}
        for spec in specs:
            seconds, state = timed(spec)
            name, _, arg = spec.partition(":")
            if name in ("fp16", "bf16"):
                frac = 0.5
            elif name == "topk":
                frac = math.ceil(float(arg) * numel) * (size + INDEX_BYTES) / (numel * size)
            else:
                matrices, dense = split_matrices(state, params)
                frac = (sum(min(*m.shape, int(arg)) * sum(m.shape) for m in matrices)
                        + sum(d.numel() for d in dense)) / numel
            out[spec] = (max(0.0, seconds - base), frac)
        return out
    finally:
        comm.destroy_process_group()
