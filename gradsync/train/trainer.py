"""The training loop of `gradsync train`, the same on every rank and for every architecture.

Each rank trains on its shard of the data (:class:`~gradsync.data.ShardedSampler`); the
architecture keeps the replicas in step. At the end the ranks evaluate disjoint shards of
the held-out set and add up their sums, so the reported accuracy is exact. Set-up, the
per-step record and the summary are :mod:`gradsync.train.loop`'s, shared with the elastic
extension (:mod:`gradsync.train.elastic_run`).
"""

from __future__ import annotations

import dataclasses
import logging
import time


from .. import comm
from ..checkpoint import Checkpointer, Position
from ..data import ShardedSampler
from ..observe import (StragglerWatch, TensorBoardLog, merge_ranks, open_timeline,
                       write_run_plots)
from .architecture import Architecture
from .config import TrainConfig
from .loop import (DTYPES, MetricsWriter, RunLog, RunSetup, Tally, evaluate,  # noqa: F401
                   loader_of, make_optimizer, parameters_digest, summarize, write_summary)
from .summary import format_summary  # noqa: F401 - the public name it always had

log = logging.getLogger(__name__)


def _checkpointer(config: TrainConfig, setup: RunSetup, architecture: Architecture):
    """The run's Checkpointer and the checkpoint all ranks agreed to resume (None, None
    without --checkpoint-dir)."""
    if not config.checkpoint.dir:
        return None, None
    spec = config.workload
    # The workload's settings travel with the checkpoint: `gradsync serve` rebuilds the
    # model from them instead of guessing --hidden and --dtype from tensor shapes.
    checkpointer = Checkpointer(config.checkpoint.dir, setup.workload.model,
                                every=config.checkpoint.every, keep=config.checkpoint.keep,
                                arch=architecture, workload=spec.workload,
                                settings=dataclasses.asdict(spec))
    # Every rank: rank 0 locks the directory and decides; all load the same checkpoint.
    return checkpointer, checkpointer.load(config.checkpoint.resume, config.checkpoint.overwrite)


def train(config: TrainConfig, architecture: Architecture) -> dict | None:
    """Train ``config.workload`` on this rank.

    Returns:
        The summary on worker ranks (the same figures on each), None on serving ranks.
    """
    setup = RunSetup.from_config(config)
    workload = setup.workload
    # Every rank, servers too: aligning the clocks is collective on the whole group.
    timeline = open_timeline(config.observe.timeline, architecture.group)
    checkpointer, resumed = _checkpointer(config, setup, architecture)
    if not architecture.is_worker:
        if timeline is not None and hasattr(architecture, "set_timeline"):
            architecture.set_timeline(timeline)  # a PS server records its updates
        architecture.serve(workload.model, setup.optimizer_for,
                           save=checkpointer.save_rank_state if checkpointer else None,
                           restored=resumed.rank_state if resumed else None)
        if timeline is not None:
            timeline.close()
        return None
    pos = resumed.position if resumed else Position()
    if resumed:  # (a PS worker then pulls the servers' restored shards over it)
        workload.model.load_state_dict(resumed.state["model"])
    rank0, workers = architecture.worker_rank == 0, architecture.num_workers
    model, optimizer = architecture.prepare(workload.model, setup.optimizer_for,
                                            start_step=pos.step)
    if resumed:
        optimizer.load_state_dict(resumed.state["optimizer"])
    sampler = ShardedSampler(workload.train_set, workers, architecture.worker_rank,
                             shuffle=True, seed=config.workload.seed)
    loader = loader_of(workload.train_set, setup.batch, sampler)
    total = setup.total_steps(len(loader))
    log.info("%s: %d parameters, %d workers x batch %d, %d steps", config.workload.workload,
             setup.parameters, workers, setup.batch, total)
    if pos.step >= total and rank0:
        log.warning("the checkpoint resumed is at step %d and the run has %d steps: nothing "
                    "left to train (raise --steps or --epochs)", pos.step, total)
    run_log = RunLog(config.output, total)
    if config.observe.straggler_window and architecture.eval_group is not None:
        run_log.stragglers = StragglerWatch(architecture.eval_group,
                                            config.observe.straggler_window)
    if timeline is not None:
        run_log.timeline = timeline
        if hasattr(model, "set_timeline"):  # an architecture that records its collectives
            model.set_timeline(timeline)
    if rank0:
        run_log.lead(done=pos.step, append=pos.step > 0)
        if config.observe.tensorboard:
            run_log.scalars = TensorBoardLog(config.observe.tensorboard,
                                             setup.batch * workers, setup.lr)
    sent_before, wait_before = architecture.bytes_sent(), architecture.comm_wait_s()
    start = time.perf_counter()
    try:
        step, epoch = _loop(setup, architecture, model, optimizer, sampler, loader, pos, total,
                            checkpointer, run_log, (wait_before, sent_before or 0))
        wall = time.perf_counter() - start
    finally:
        run_log.close()
    sent = architecture.bytes_sent()
    tally = Tally(step, epoch, step - pos.step, setup.batch * workers, setup.lr,
                  waited_s=architecture.comm_wait_s() - wait_before,
                  sent=None if sent is None else sent - (sent_before or 0))
    summary = summarize(setup, architecture, model, tally, run_log, wall)
    if run_log.stragglers is not None:
        summary.update(run_log.stragglers.report())
    if rank0:
        write_summary(config.output.out, summary)
        if config.output.out and config.observe.plots:
            write_run_plots(config.output.out)
    if run_log.scalars is not None:
        run_log.scalars.finish(summary)
    if rank0 and timeline is not None:
        # summarize() is collective on the workers, so each has closed its file by now.
        merged = merge_ranks(config.observe.timeline, architecture.group.size)
        log.info("timeline of ranks %s: %s", merged, config.observe.timeline)
    return summary


def _loop(setup: RunSetup, architecture: Architecture, model, optimizer, sampler, loader,
          pos: Position, total: int, checkpointer, run_log: RunLog,
          before: tuple[float, int]) -> tuple[int, int]:
    """The steps from ``pos`` to ``total``; returns the step and epoch reached. ``before``:
    the architecture's wait seconds and bytes sent when the loop began (the records count
    from there)."""
    step, epoch = pos.step, pos.epoch
    (wait0, sent0), compress0 = before, architecture.compress_s()
    tl = run_log.timeline
    while step < total:
        sampler.set_epoch(epoch)
        consumed = 0
        if epoch == pos.epoch and pos.consumed:
            sampler.set_position(pos.consumed)  # resume mid-epoch
            consumed = pos.consumed
        for x, y in loader:
            comm.set_step(step)
            if tl is not None:
                tl.step = step + 1  # numbered as in metrics.jsonl
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = setup.forward_backward(model, x, y, timeline=tl)
            t_opt = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - t0
            step += 1
            consumed += len(x)
            if tl is not None:
                tl.record("optimizer step", t_opt, t0 + elapsed)
                tl.record("step", t0, t0 + elapsed)
            if checkpointer is not None:
                t_save = time.perf_counter()
                if checkpointer.maybe_save(Position(step, epoch, consumed),
                                           setup.workload.model, optimizer) and tl is not None:
                    tl.record("checkpoint write", t_save, time.perf_counter())
            run_log.step({"step": step, "epoch": epoch, "loss": loss, "step_time_s": elapsed,
                          "comm_wait_s": architecture.comm_wait_s() - wait0,
                          "bytes_sent": (architecture.bytes_sent() or 0) - sent0,
                          "compress_s": architecture.compress_s() - compress0})
            if step >= total:
                break
        epoch += 1
    return step, epoch
