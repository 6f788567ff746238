"""`gradsync train --elastic`: the launcher hosts the store and the coordinator, each worker
trains a workload through :class:`~gradsync.train.elastic.ElasticLoop`.

    gradsync train --elastic --workers 4 --min-workers 2 --max-restarts 1

The launcher side (:func:`launch`, which starts a script's elastic workers too;
:func:`run_local` for `gradsync train`) serves the rendezvous store in its own process, so a
lost worker (rank 0 too) takes nothing with it, and supervises the workers with
:func:`gradsync.launcher.elastic.run_elastic`. The worker side (:func:`run_worker`) is the
trainer's loop on an elastic membership; the summary adds the membership changes.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time

import torch
from torch.utils.data import default_collate

from .. import comm
from ..comm.elastic import Coordinator, ElasticWorld
from .config import TrainConfig
from .elastic import ElasticLoop
from .trainer import (DTYPES, MetricsWriter, _progress, evaluate, make_optimizer,
                      parameters_digest)
from .workloads import build_workload

log = logging.getLogger(__name__)


def launch(cmd: list[str], workers: int, *, min_workers: int = 1, max_restarts: int = 0,
           addr: str = "127.0.0.1", port: int | None = None, timeout_s: float = 300.0,
           env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` as ``workers`` elastic workers on this machine, serving their store and
    coordinator here; the exit status of the run. A script's workers join through
    ``ElasticWorld.from_env`` (MASTER_ADDR, MASTER_PORT, GRADSYNC_ELASTIC_UID)::

        sys.exit(launch([sys.executable, "train.py"], 4, min_workers=2, max_restarts=1))
    """
    from ..launcher.elastic import run_elastic
    from ..launcher.launch import _worker_env

    try:
        coordinator = Coordinator(addr, port, workers, min_workers, timeout_s)
    except RuntimeError as exc:
        print(f"gradsync: error: {exc}", file=sys.stderr, flush=True)
        return 2

    def env_of(uid: int) -> dict[str, str]:
        out = _worker_env(uid, workers, addr, coordinator.port, env)
        out["GRADSYNC_ELASTIC_UID"] = str(uid)
        return out

    result = run_elastic(cmd, env_of, workers, coordinator, max_restarts=max_restarts)
    if result.returncode == 130:
        print("gradsync: interrupted", file=sys.stderr, flush=True)
    return result.returncode


def run_local(config: TrainConfig, env: dict[str, str]) -> int:
    """`gradsync train --elastic`: start the workers here and supervise them."""
    from ..flags import to_argv

    launch_config = config.launch
    return launch([sys.executable, "-m", "gradsync", "train", *to_argv(config)],
                  launch_config.workers, min_workers=launch_config.min_workers,
                  max_restarts=launch_config.max_restarts, addr=launch_config.addr,
                  port=launch_config.port, timeout_s=launch_config.timeout, env=env)


def run_worker(config: TrainConfig, format_summary) -> dict | None:
    """Train as one elastic worker; rank 0 of the last generation prints the summary.
    Returns the summary."""
    spec = config.workload
    workload = build_workload(spec.workload, seed=spec.seed, hidden=spec.hidden,
                              dtype=DTYPES[spec.dtype])
    batch = config.optim.batch_size or workload.default_batch_size
    lr = config.optim.lr or workload.default_lr
    world = ElasticWorld.from_env(config.launch.timeout)
    loop = ElasticLoop(
        world, workload.model, lambda params: make_optimizer(workload.optimizer, params, lr),
        len(workload.train_set), batch, config.launch.workers,
        rescale=config.launch.elastic_rescale, seed=spec.seed,
        check_every=config.launch.elastic_check_every,
        allreduce={"algorithm": config.allreduce.algorithm,
                   "bucket_cap_mb": config.allreduce.bucket_cap_mb,
                   "nonfinite": config.optim.on_nonfinite,
                   "compression": config.compression.compression,
                   "compression_warmup": config.compression.compression_warmup})
    train_set = workload.train_set

    def step_fn(model, indices, weight):
        x, y = default_collate([train_set[i] for i in indices])
        loss = workload.loss_fn(model(x), y)
        (loss * weight if weight != 1.0 else loss).backward()
        return loss.item()

    epochs = config.optim.epochs or workload.default_epochs
    steps = config.optim.steps
    total = steps if steps is not None else epochs * math.ceil(
        len(train_set) / (batch * config.launch.workers))
    step_times: list[float] = []
    losses: list[float] = []
    leader: dict = {}  # this worker's writer and bar while it is the group's rank 0

    def on_step(record: dict) -> None:
        step_times.append(record["step_time_s"])
        losses.append(record["loss"])
        if loop.group.rank != 0:
            return
        if not leader:  # a later leader continues the metrics of the one it follows
            leader["writer"] = MetricsWriter(config.output.out, True, append=bool(loop.changes))
            leader["bar"] = _progress(total, config.output.progress)
            if leader["bar"] is not None:
                leader["bar"].update(record["step"] - 1)
        leader["writer"].step(record)
        if leader["bar"] is not None:
            leader["bar"].update(1)
            leader["bar"].set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                                      workers=record["workers"], refresh=False)

    start = time.perf_counter()
    try:
        loop.run(step_fn, steps=steps, epochs=None if steps is not None else epochs,
                 on_step=on_step)
    finally:
        if leader.get("bar") is not None:
            leader["bar"].close()
        if leader:
            leader["writer"].close()
    wall = time.perf_counter() - start
    return _summarize(config, loop, workload, batch, lr, wall, step_times, losses,
                      format_summary)


def _summarize(config, loop: ElasticLoop, workload, batch, lr, wall, step_times, losses,
               format_summary) -> dict:
    group, arch = loop.group, loop.architecture
    assert arch is not None
    extra = arch.finish()
    recent = statistics.fmean(losses[-20:]) if losses else float("nan")
    share = min(max(arch.comm_wait_s(), 0.0) / wall, 1.0) if wall > 0 else 0.0
    tail = torch.tensor([recent, share], dtype=torch.float64)
    comm.all_reduce(tail, op="avg", group=group, algorithm="native")
    evaluation = evaluate(loop.wrapped, workload, group, batch)
    n_params = sum(p.numel() for p in workload.model.parameters())
    pos, workers = loop.position, group.size
    summary = {
        "workload": config.workload.workload, "arch": "allreduce",
        "algorithm": arch.algorithm, "workers": workers, "parameters": n_params,
        "steps": pos.step, "epochs": pos.epoch, "steps_run": len(step_times),
        "batch_per_worker": loop.global_batch(workers) // workers,
        "global_batch": loop.global_batch(workers),
        "lr": loop.optimizer.param_groups[0]["lr"],
        "train_loss": tail[0].item(), **{f"eval_{k}": v for k, v in evaluation.items()},
        "wall_s": wall,
        "samples_per_s": len(step_times) * loop.global_batch(workers) / wall,
        "step_time_ms_median": 1e3 * statistics.median(step_times or [0.0]),
        "samples_per_s_median_step": loop.global_batch(workers) / statistics.median(
            step_times) if step_times else 0.0,
        "comm_wait_s": tail[1].item() * wall, "compute_s": (1 - tail[1].item()) * wall,
        "bytes_per_step_per_worker": arch.bytes_sent() / max(len(step_times), 1),
        "parameters_sha1": parameters_digest(loop.wrapped), **extra,
        "elastic": {"generation": loop.world.gen, "members": list(loop.world.members),
                    "rescale": loop.rescale, "changes": [vars(c) for c in loop.changes]},
    }
    if group.rank == 0:
        writer = MetricsWriter(config.output.out, True, append=True)
        writer.summary(summary)
        writer.close()
        print(format_summary(summary), flush=True)
    return summary
