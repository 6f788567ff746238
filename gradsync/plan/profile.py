"""Measure once, locally: what one worker's step costs without any communication.

A :class:`Profile` holds, for a workload and a batch per worker, the medians over a few
steps of one process (one thread, as each rank of a run has on a shared machine):

- ``data_s``, ``forward_s``, ``backward_s``, ``optimizer_s``: the phases of a step;
- ``grads``: for each parameter, in the order backward produces its gradient, the seconds
  from the start of backward to that moment and the gradient's bytes (what a bucket or a
  partition waits for before it can be sent);
- ``codecs``: per compressor, the seconds to compress and decompress one step's gradients,
  the fraction of the dense bytes that crosses the wire, and the share of those seconds
  spent inside the hook call (during backward, on the training thread) rather than at its
  wait (after backward).

Nothing here communicates; the predictions (predict.py) add the network.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
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
    codecs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """compression spec -> (seconds per step to encode and decode, wire bytes / dense bytes,
    the share of the seconds spent at launch; PowerSGD: the share of the wire bytes in its
    first all-reduce. Profiles saved before them lack the last fields)."""
    hidden: int = 1024
    """The workload's width (synthetic-mlp, digits-wide)."""
    loaded: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    """compression spec -> [(ranks per core, CPU seconds per step in the hook's calls, in
    its waits, in the whole step)]: DataParallel with the hook ("none": without) on every
    rank of a world that loads this machine's cores (loaded.py); empty unless measured
    (``gradsync plan --lab``)."""

    @property
    def grad_bytes(self) -> int:
        return sum(b for _, b in self.grads)

    @property
    def compute_s(self) -> float:
        return self.data_s + self.forward_s + self.backward_s + self.optimizer_s

    def buckets(self, cap_bytes: float) -> list[tuple[float, int]]:
        """DataParallel's buckets (allreduce/buckets.py): in the order the gradients become
        ready, a bucket closes once it holds ``cap_bytes`` (the first: at most 1 MiB).
        (ready time of its last parameter, bytes) each."""
        out: list[tuple[float, int]] = []
        ready, size = 0.0, 0
        for t, b in self.grads:
            ready, size = t, size + b
            if size >= (min(cap_bytes, 1 << 20) if not out else cap_bytes):
                out.append((ready, size))
                size = 0
        if size:
            out.append((ready, size))
        return out

    def codec(self, spec: str, load: float | None = None) -> tuple[float, float]:
        """(seconds ``spec`` adds to a step, the share of them in its hook's calls): at
        ``load`` ranks per core from the loaded measurement where there is one (None: a
        core per rank; loaded.codec_at), else the one-rank timing. (0, 0.5) for none."""
        if spec not in self.codecs:  # "none"
            return 0.0, 0.5
        if load is not None and self.loaded.get(spec) and self.loaded.get("none"):
            from .loaded import codec_at

            return codec_at(self, spec, load)
        return self.codecs[spec][0], self.launch_share(spec)

    def launch_share(self, spec: str) -> float:
        """The share of ``spec``'s codec time spent in the hook call (0.5 when unknown)."""
        codec = self.codecs.get(spec, ())
        return codec[2] if len(codec) > 2 else 0.5

    def first_share(self, spec: str) -> float:
        """PowerSGD: the share of ``spec``'s wire bytes in its first all-reduce (the
        uncompressed vectors and every P; the rest is every Q). 0.5 when unknown."""
        codec = self.codecs.get(spec, ())
        return codec[3] if len(codec) > 3 else 0.5

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
        raw["loaded"] = {k: [tuple(p) for p in v] for k, v in raw.get("loaded", {}).items()}
        return cls(**raw)


def measure(workload: str, batch: int | None = None, *, steps: int = 12, seed: int = 0,
            hidden: int = 1024, specs: tuple[str, ...] = CODECS, loaded: bool = False
            ) -> Profile:
    """Time ``steps`` steps of ``workload`` (after two warm-up steps) in this process, one
    thread; the medians of each phase, and the cost of each compressor in ``specs``
    (``loaded``: also on worlds that load every core, loaded.py)."""
    from ..train.loop import make_optimizer
    from ..workloads import build_workload

    w = build_workload(workload, seed=seed, hidden=hidden)
    batch = batch or w.default_batch_size

    def collate():
        return default_collate([w.train_set[i % len(w.train_set)] for i in range(batch)])

    profile = measure_module(
        w.model, collate(), w.loss_fn, steps=steps, specs=specs, name=workload,
        optimizer=lambda params: make_optimizer(w.optimizer, params, w.default_lr),
        loaded=loaded)
    return replace(profile, data_s=median_time(collate, steps), hidden=hidden)


def measure_module(module: torch.nn.Module, sample: tuple, loss_fn: Callable, *,
                   optimizer: Callable | None = None, steps: int = 12,
                   specs: tuple[str, ...] = CODECS, group=None, name: str = "module",
                   loaded: bool = False) -> Profile:
    """Time a copy of ``module`` on ``sample`` = (inputs, targets), one thread (the caller's
    thread count is restored after).

    Args:
        module: the model (left untouched: a deep copy is timed).
        sample: one batch, (inputs, targets); the batch is the inputs' first dimension.
        loss_fn: ``loss_fn(module(inputs), targets)``.
        optimizer: ``optimizer(params)``; default SGD (the step's cost is what matters).
        steps: timed steps, after two warm-up steps.
        specs: the compressors to time (see :func:`codecs`).
        group: a one-rank group to time the compressors' hooks on (a script whose world is
            up); None: a one-rank world of its own.
        name: the profile's workload name.
        loaded: also time the hooks on worlds of this machine's cores and twice as many
            ranks (loaded.py; forks, so only without a group).
    Returns:
        The :class:`Profile` (no data loading: ``data_s`` 0).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = copy.deepcopy(module)
        make = optimizer or (lambda params: torch.optim.SGD(params, lr=1e-3))
        x, y = sample
        med, grads = _phases(model, make(model.parameters()), x, y, loss_fn, steps)

        def step(m: torch.nn.Module) -> None:
            loss_fn(m(x), y).backward()

        under_load = {}
        if loaded and group is None and specs:
            from .loaded import measure_loaded

            under_load = measure_loaded(model, sample, loss_fn, specs, make)
        return Profile(name, len(x), *med, 0.0, grads,
                       codecs(model, step, steps, specs, group), loaded=under_load)
    finally:
        torch.set_num_threads(threads)


def _phases(model, optimizer, x, y, loss_fn, steps: int):
    """([forward, backward, optimizer] medians, [(ready after backward starts, bytes)])."""
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
        loss = loss_fn(model(x), y)
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
    return [statistics.median(p[k] for p in phases) for k in range(3)], grads


def codecs(model: torch.nn.Module, step: Callable[[torch.nn.Module], None], repeat: int,
           specs: tuple[str, ...] = CODECS, group=None) -> dict[str, tuple[float, ...]]:
    """Per compressor of ``specs``: (seconds a step spends in it, wire fraction, launch
    share[, PowerSGD: the first all-reduce's share of the wire]). Each is timed through gradsync's own hook on a one-rank world (its collectives
    move nothing, its encoding and decoding run as in a run): the median over steps of the
    seconds spent in the hook's calls and their handles' waits (timing the hook itself, not
    the step with it minus the step without, whose difference drowns in the noise of a
    busy machine). The launch share is the part spent in the calls (PowerSGD: error
    feedback and P = M Q; top-k: the selection), during backward, rather than in the waits
    (the rest, after backward). The wire fraction is each format's arithmetic on one
    bucket of every gradient: halves 0.5; top-k its k values and int64 indices; PowerSGD
    r (n + m) for each matrix its hook compresses, the rest dense; its first all-reduce
    carries r n of each matrix (P) and the dense rest, its second r m (Q)."""
    from .. import comm
    from ..allreduce import DataParallel
    from ..compress.powersgd import split_matrices
    from ..compress.spec import make_hook
    from ..compress.topk import INDEX_BYTES
    from ..launcher import find_free_port
    from .loaded import split_timer, timed_steps

    if not specs:
        return {}
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    size = params[0].element_size()
    own = group is None  # else the caller's one-rank group, left as it is
    if own:
        group = comm.init_process_group("gloo", rank=0, world_size=1, master_addr="127.0.0.1",
                                        master_port=find_free_port())
    try:
        def timed(spec: str) -> tuple[float, object, float]:
            dp = DataParallel(copy.deepcopy(model), group=group, topology=None)
            state, hook = make_hook(spec, group)
            split = [0.0, 0.0]  # seconds in the hook calls, in their waits, this step
            dp.register_comm_hook(state, split_timer(hook, split))
            per_step = timed_steps(lambda: step(dp), split, repeat)  # after one warm-up
            total = statistics.median(a + b for a, b, _ in per_step)
            launch = statistics.median(a for a, _, _ in per_step)
            return total, state, min(1.0, launch / max(total, 1e-12))

        out = {}
        for spec in specs:
            seconds, state, share = timed(spec)
            name, _, arg = spec.partition(":")
            if name in ("fp16", "bf16"):
                frac = 0.5
            elif name == "topk":
                frac = math.ceil(float(arg) * numel) * (size + INDEX_BYTES) / (numel * size)
            else:
                matrices, dense = split_matrices(state, params)
                p_and_dense = (sum(min(*m.shape, int(arg)) * m.shape[0] for m in matrices)
                               + sum(d.numel() for d in dense))
                q = sum(min(*m.shape, int(arg)) * m.shape[1] for m in matrices)
                frac = (p_and_dense + q) / numel
                out[spec] = (seconds, frac, share, p_and_dense / max(p_and_dense + q, 1))
                continue
            out[spec] = (seconds, frac, share)
        return out
    finally:
        if own:
            comm.destroy_process_group()
