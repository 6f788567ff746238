"""Each compressor's cost on a loaded machine: its hook's CPU per step on every rank of a
world of ``cores`` ranks, then of ``2 x cores`` ranks, all on this machine at once.

The one-rank timing (profile.codecs) is what the hook costs alone on a core. On shared
cores (the lab: every host is a namespace of this machine) a rank's hook costs more CPU
than that, not only more wall time: its neighbours share the caches and the memory bus,
a rank that is switched out comes back to cold caches, and the hook's collectives run
for real (top-k's engine all-gathers start inside the call). Timed inside digits-wide's
lab runs at 200 Mbit (docs/benchmarks.md section 16), the hook's CPU per step was, against
2.9 ms one-rank for PowerSGD: 3.2 ms with 2 ranks on 2 cores, 4.95 with 4; top-k 15.3
and 15.8 ms against 10-11 one-rank.

So the profile measures it the same way, on loopback: ``load`` x cores ranks (a gloo
world of processes forked from this one), each running the profiled step through
DataParallel with the compressor's hook, and each timing the CPU of its own thread in
the hook's calls and in its handles' waits (``time.thread_time``: what the rank itself
spends, whether it waited for a core or not). The figures kept are the medians over
steps and then over ranks, per load; predict.py reads them at the lab's ranks per core
(:meth:`Profile.codec`).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch

# The loads measured, in ranks per core: a busy neighbour on every core, then two ranks
# on each (the settings of section 16 run 1.5 to 3).
LOADS = (1, 2)


def measure_loaded(model: torch.nn.Module, sample: tuple, loss_fn: Callable,
                   specs: tuple[str, ...], optimizer: Callable, steps: int = 8,
                   loads: tuple[int, ...] = LOADS, timeout_s: float = 300.0
                   ) -> dict[str, list[tuple[float, ...]]]:
    """spec -> [(ranks per core, CPU seconds per step in the hook's calls, in its waits,
    in the whole step)], one entry per load ("none": DataParallel without a hook). Forks
    the ranks: call it before this process starts a group."""
    specs = ("none", *specs)
    cores = os.cpu_count() or 1
    out: dict[str, list[tuple[float, ...]]] = {spec: [] for spec in specs}
    for load in loads:
        world = max(2, load * cores)
        per_rank = _run_world(world, (model, sample, loss_fn, optimizer), specs, steps,
                              timeout_s)
        for spec in specs:
            out[spec].append((world / cores, *(statistics.median(r[spec][k] for r in per_rank)
                                               for k in range(3))))
    return out


def _run_world(world: int, job: tuple, specs, steps, timeout_s) -> list[dict]:
    """Start ``world`` forked ranks on loopback and collect each one's timings."""
    from ..launcher import find_free_port

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = find_free_port()
    ranks = [ctx.Process(target=_rank, daemon=True,
                         args=(r, world, port, job, specs, steps, results))
             for r in range(world)]
    for p in ranks:
        p.start()
    try:
        got = [results.get(timeout=timeout_s) for _ in ranks]
    finally:
        for p in ranks:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = [g for g in got if isinstance(g, str)]
    if failed:
        raise RuntimeError(f"timing the compressors on {world} ranks failed: {failed[0]}")
    return got


def _rank(rank: int, world: int, port: int, job: tuple, specs, steps, results) -> None:
    """One rank: each spec's hook on DataParallel, ``steps`` timed steps after two."""
    try:
        results.put(_time_hooks(rank, world, port, job, specs, steps))
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        results.put(f"rank {rank}: {type(exc).__name__}: {exc}")


def _time_hooks(rank, world, port, job, specs, steps) -> dict:
    """spec -> (hook calls', waits', whole steps' CPU seconds: medians over the steps)."""
    from .. import comm
    from ..allreduce import DataParallel
    from ..compress.spec import make_hook

    torch.set_num_threads(1)
    group = comm.init_process_group("gloo", rank=rank, world_size=world,
                                    master_addr="127.0.0.1", master_port=port)
    model, (x, y), loss_fn, optimizer = job
    out = {}
    try:
        for spec in specs:
            dp = DataParallel(copy.deepcopy(model), group=group, topology=None)
            opt = optimizer(dp.parameters())
            split = [0.0, 0.0]
            if spec != "none":
                state, hook = make_hook(spec, group)
                dp.register_comm_hook(state, split_timer(hook, split, clock=time.thread_time))

            def one_step(dp=dp, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn(dp(x), y).backward()
                opt.step()
            per_step = timed_steps(one_step, split, steps, warmup=2, clock=time.thread_time)
            out[spec] = tuple(statistics.median(s[k] for s in per_step) for k in range(3))
    finally:
        comm.destroy_process_group()
    return out


def codec_at(profile, spec: str, load: float) -> tuple[float, float]:
    """(CPU seconds a step of ``spec`` adds to a rank's step, the share of its hook's
    CPU spent in the calls) at ``load`` ranks per core: the loaded step with the hook less
    the loaded step without one."""
    call, wait, step = at_load(profile.loaded[spec], load)
    added = max(0.0, step - at_load(profile.loaded["none"], load)[2])
    return added, (call / (call + wait) if call + wait > 0 else 0.5)


def stretched(profile, load: float | None):
    """``profile`` with backward (and every gradient's ready time) stretched by what a
    rank of a loaded world spends beyond the profiled phases in a step of DataParallel
    without a hook (its buckets' copies and Python, its compute under load): the compute
    of an all-reduce rank at ``load`` ranks per core. Unchanged without a measurement."""
    if load is None or not profile.loaded.get("none") or profile.backward_s <= 0:
        return profile
    phases = profile.forward_s + profile.backward_s + profile.optimizer_s
    extra = max(0.0, at_load(profile.loaded["none"], load)[2] - phases)
    r = (profile.backward_s + extra) / profile.backward_s
    return replace(profile, backward_s=profile.backward_s * r,
                   grads=[(t * r, b) for t, b in profile.grads])


def at_load(loaded: list[tuple[float, ...]], load: float) -> tuple[float, ...]:
    """The measured figures (all but the load) at ``load`` ranks per core: linear between
    the measured loads, the nearest one's outside them (not extrapolated: 6 ranks on 2
    cores spent no more CPU a step than 4 in the lab)."""
    points = sorted(loaded)
    if load <= points[0][0]:
        return points[0][1:]
    if load >= points[-1][0]:
        return points[-1][1:]
    a, b = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= load <= b[0])
    f = (load - a[0]) / (b[0] - a[0])
    return tuple(u + f * (v - u) for u, v in zip(a[1:], b[1:]))


def timed_steps(run: Callable[[], None], split: list[float], steps: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, ...]]:
    """Call ``run`` (one step) ``warmup`` + ``steps`` times; per timed step, (seconds by
    ``clock`` in the hook's calls, in its waits, in the whole step), ``split`` being the
    accumulators a :func:`split_timer` hook adds to."""
    out = []
    for i in range(warmup + steps):
        split[:] = [0.0, 0.0]
        start = clock()
        run()
        if i >= warmup:
            out.append((*split, clock() - start))
    return out


def split_timer(hook, split: list[float], clock: Callable[[], float] = time.perf_counter):
    """``hook`` adding its call's seconds (by ``clock``) to split[0], its wait's to split[1]."""
    from .. import comm

    def timed(state, bucket):
        start = clock()
        handle = hook(state, bucket)
        split[0] += clock() - start

        def finish():
            start = clock()
            result = handle.wait()
            split[1] += clock() - start
            return result
        return comm.Work(finish)
    return timed
