"""The training loop of `gradsync train`, the same on every rank and for every architecture.

Each rank trains on its shard of the data (:class:`~gradsync.data.ShardedSampler`); the
architecture keeps the replicas in step. At the end the ranks evaluate disjoint shards of
the held-out set and add up their sums, so the reported accuracy is exact.
"""

from __future__ import annotations

import hashlib

import json
import logging
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import comm
from ..data import ShardedSampler
from .architecture import Architecture
from .config import TrainConfig
from ..checkpoint import Checkpointer, Position
from .workloads import Workload, build_workload, summarize_eval

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


class MetricsWriter:
    """metrics.jsonl (one line per step) and summary.json under ``out``, rank 0 only."""

    def __init__(self, out: str | None, enabled: bool, append: bool = False):
        self.dir = Path(out) if (out and enabled) else None
        self._file = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A resumed run continues the metrics of the run it resumes.
            self._file = open(self.dir / "metrics.jsonl", "a" if append else "w",
                              encoding="utf-8")

    def step(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # readable while the run goes on

    def summary(self, summary: dict) -> None:
        if self.dir is not None:
            tmp = self.dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.dir / "summary.json")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)


def evaluate(model: torch.nn.Module, workload: Workload, group: comm.Group | None,
             batch_size: int) -> dict[str, float]:
    """Exact evaluation: every held-out sample is seen once across the ranks of ``group``
    (or by this rank alone when ``group`` is None), and their sums are added."""
    replicas, rank = (group.size, group.rank) if group is not None else (1, 0)
    sampler = ShardedSampler(workload.eval_set, replicas, rank, eval_mode=True)
    loader = DataLoader(workload.eval_set, batch_size=batch_size, sampler=sampler)
    sums = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            sums += workload.eval_sums(model(x), y)
    model.train()
    if group is not None:
        comm.all_reduce(sums, op="sum", group=group, algorithm="native")
    return summarize_eval(workload, sums)


def train(config: TrainConfig, architecture: Architecture) -> dict | None:
    """Train ``config.workload`` on this rank.

    Returns:
        The summary on worker ranks (the same figures on each), None on serving ranks.
    """
    spec = config.workload
    workload = build_workload(spec.workload, seed=spec.seed, hidden=spec.hidden,
                              dtype=DTYPES[spec.dtype])
    batch = config.optim.batch_size or workload.default_batch_size
    lr = config.optim.lr or workload.default_lr

    def optimizer_for(params):
        return make_optimizer(workload.optimizer, params, lr)

    checkpointer, resumed = None, None
    if config.checkpoint.dir:
        checkpointer = Checkpointer(config.checkpoint.dir, config.checkpoint.every,
                                    config.checkpoint.keep, architecture, spec.workload,
                                    workload.model)
        # Every rank: rank 0 locks the directory and decides; all load the same checkpoint.
        resumed = checkpointer.start(config.checkpoint.resume, config.checkpoint.overwrite)
    if not architecture.is_worker:
        architecture.serve(workload.model, optimizer_for,
                           save=checkpointer.save_rank_state if checkpointer else None,
                           restored=resumed.rank_state if resumed else None)
        return None
    pos = resumed.position if resumed else Position()
    if resumed:  # (a PS worker then pulls the servers' restored shards over it)
        workload.model.load_state_dict(resumed.state["model"])
    rank0 = architecture.worker_rank == 0
    workers = architecture.num_workers
    model, optimizer = architecture.prepare(workload.model, optimizer_for, start_step=pos.step)
    if resumed:
        optimizer.load_state_dict(resumed.state["optimizer"])
    sampler = ShardedSampler(workload.train_set, workers, architecture.worker_rank,
                             shuffle=True, seed=config.workload.seed)
    loader = DataLoader(workload.train_set, batch_size=batch, sampler=sampler)
    epochs = config.optim.epochs or workload.default_epochs
    total = config.optim.steps if config.optim.steps is not None else epochs * len(loader)
    n_params = sum(p.numel() for p in workload.model.parameters())
    log.info("%s: %d parameters, %d workers x batch %d, %d steps", spec.workload, n_params,
             workers, batch, total)
    if pos.step >= total and rank0:
        log.warning("the checkpoint resumed is at step %d and the run has %d steps: nothing "
                    "left to train (raise --steps or --epochs)", pos.step, total)

    writer = MetricsWriter(config.output.out, rank0, append=pos.step > 0)
    bar = _progress(total, rank0 and config.output.progress)
    step_times, losses = [], []
    bytes_before = architecture.bytes_sent() or 0
    wait_before = architecture.comm_wait_s()
    compress_before = architecture.compress_s()
    step, epoch, first_step = pos.step, pos.epoch, pos.step
    if bar is not None:
        bar.update(step)
    start = time.perf_counter()
    try:
        while step < total:
            sampler.set_epoch(epoch)
            consumed = 0
            if epoch == pos.epoch and pos.consumed:
                sampler.set_position(pos.consumed)  # resume mid-epoch
                consumed = pos.consumed
            for x, y in loader:
                comm.set_step(step)
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = workload.loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                step_times.append(time.perf_counter() - t0)
                losses.append(loss.item())
                step += 1
                consumed += len(x)
                if checkpointer is not None:
                    checkpointer.maybe_save(Position(step, epoch, consumed), workload.model,
                                            optimizer)
                writer.step({"step": step, "epoch": epoch, "loss": losses[-1],
                             "step_time_s": step_times[-1],
                             "comm_wait_s": architecture.comm_wait_s() - wait_before,
                             "bytes_sent": (architecture.bytes_sent() or 0) - bytes_before,
                             "compress_s": architecture.compress_s() - compress_before})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", refresh=False)
                if step >= total:
                    break
            epoch += 1
        wall = time.perf_counter() - start
    finally:
        if bar is not None:
            bar.close()
        writer.close()

    # This rank's share of the loop spent waiting; shares (not seconds) are averaged over the
    # ranks, so the split of the summary adds up to its wall time on every rank.
    comm_share = min(max(architecture.comm_wait_s() - wait_before, 0.0) / wall, 1.0) \
        if wall > 0 else 0.0
    done = max(step - first_step, 1)  # steps run by this process (after a resume: since it)
    sent = architecture.bytes_sent()
    bytes_per_step = None if sent is None else (sent - bytes_before) / done
    extra = architecture.finish()
    recent = statistics.fmean(losses[-20:]) if losses else float("nan")
    tail = torch.tensor([recent, comm_share], dtype=torch.float64)
    group = architecture.eval_group
    if group is not None:
        comm.all_reduce(tail, op="avg", group=group, algorithm="native")
    evaluation = evaluate(model, workload, group, batch) if (group is not None or rank0) else {}
    summary = {
        "workload": spec.workload, "arch": architecture.name,
        "algorithm": config.allreduce.algorithm,
        "workers": workers, "parameters": n_params, "steps": step, "epochs": epoch,
        "steps_run": step - first_step,
        "batch_per_worker": batch, "global_batch": batch * workers, "lr": lr,
        "train_loss": tail[0].item(), **{f"eval_{k}": v for k, v in evaluation.items()},
        "wall_s": wall, "samples_per_s": (step - first_step) * batch * workers / wall,
        "step_time_ms_median": 1e3 * statistics.median(step_times or [0.0]),
        # Throughput of a typical step: free of start-up and of the first, slow steps.
        "samples_per_s_median_step": batch * workers / statistics.median(step_times)
        if step_times else 0.0,
        "comm_wait_s": tail[1].item() * wall, "compute_s": (1 - tail[1].item()) * wall,
        "bytes_per_step_per_worker": bytes_per_step,
        # Runs that must agree to the bit (another algorithm, another network) compare this.
        "parameters_sha1": parameters_digest(model), **extra,
    }
    writer.summary(summary)
    return summary


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter's bytes, in the order of ``named_parameters``."""
    digest = hashlib.sha1()
    for _, p in model.named_parameters():
        digest.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _communicated(s: dict) -> str:
    sent = s["bytes_per_step_per_worker"]
    if sent is None:
        return "not measured (torch DDP)"
    line = f"{sent / 1e6:.3f} MB sent per step per worker"
    if set(s.get("bucket_algorithms") or ()) == {"shm"}:
        line += " (the gradients went through shared memory)"
    return line


def format_summary(s: dict) -> str:
    """The human-readable summary rank 0 prints at the end."""
    how = {"ps": f"ps, {s.get('servers')} servers, {s.get('consistency')}",
           "allreduce": f"allreduce, algorithm {s['algorithm']}" + (
               f" ({_buckets(s['bucket_algorithms'])})" if s.get("bucket_algorithms") else ""),
           "ddp": "baseline: torch DistributedDataParallel",
           "local": "baseline: one process, no wrapper"}.get(s["arch"], s["arch"])
    lines = [f"gradsync train: {s['workload']} on {s['workers']} workers ({how})",
             f"  steps              {s['steps']} ({s['epochs']} epochs, global batch "
             f"{s['global_batch']}, {s['parameters']:,} parameters)"]
    if "eval_perplexity" in s:
        lines.append(f"  eval loss          {s['eval_loss']:.4f} (perplexity "
                     f"{s['eval_perplexity']:.2f}, next-byte accuracy "
                     f"{100 * s['eval_accuracy']:.1f} %)")
    else:
        lines.append(f"  eval accuracy      {100 * s['eval_accuracy']:.2f} % (loss "
                     f"{s['eval_loss']:.4f})")
    if s.get("steps_run", 1) == 0:
        lines.append(f"  no step run        the checkpoint resumed was at step {s['steps']} "
                     "already")
        return "\n".join(lines)
    comm_pct = 100 * s["comm_wait_s"] / s["wall_s"] if s["wall_s"] else 0.0
    lines += [f"  train loss         {s['train_loss']:.4f} (mean of the last 20 steps)",
              f"  throughput         {s['samples_per_s']:,.0f} samples/s in {s['wall_s']:.1f} s "
              f"(median step {s['step_time_ms_median']:.1f} ms)",
              f"  time               compute {s['compute_s']:.2f} s, waiting on communication "
              f"{s['comm_wait_s']:.2f} s ({comm_pct:.0f} %)",
              "  communicated       " + _communicated(s)]
    if s.get("compression", "none") != "none":
        lines.append(f"  compression        {s['compression']}: "
                     f"{s['compression_ratio']:.1f}x fewer gradient bytes than uncompressed"
                     + (f", {s['compress_s']:.2f} s compressing" if "compress_s" in s else ""))
    changes = s.get("elastic", {}).get("changes", [])
    if changes:
        lines.append(f"  membership         {len(changes)} change{'s' * (len(changes) > 1)}: "
                     + "; ".join(_change(c) for c in changes))
    skipped = s.get("nonfinite_skipped", 0)
    skipped = sum(skipped) if isinstance(skipped, list) else skipped
    if skipped:
        lines.append(f"  skipped updates    {skipped} (NaN or Inf gradients, --on-nonfinite skip)")
    if s["arch"] == "ps":
        lines += [f"  servers            received {_mb(s['bytes_received_per_step_per_server'])} "
                  f"MB and sent {_mb(s['bytes_sent_per_step_per_server'])} MB per step; busy "
                  f"{', '.join(f'{b:.2f}' for b in s['server_busy_s'])} s",
                  f"  staleness          max {s['max_staleness']}, histogram "
                  f"{s['staleness_histogram']}, max lead {s['max_lead']} steps"]
        if s["dropped_workers"]:
            lines.append(f"  dropped workers    ranks {s['dropped_workers']} (lost during the "
                         f"run; the others went on)")
    return "\n".join(lines)


def _change(c: dict) -> str:
    """'member 2 left at step 37 (0.84 s)' for one elastic membership change."""
    who = [f"{_plural('member', c[k])} {', '.join(map(str, c[k]))} {k}"
           for k in ("left", "joined") if c[k]]
    return f"{' and '.join(who)} at step {c['step']} ({c['recover_s']:.2f} s)"


def _plural(word: str, items: list) -> str:
    return word + "s" * (len(items) > 1)


def _buckets(algorithms: list[str]) -> str:
    """'aware for 2 buckets' / 'native for 1 bucket, aware for 2'."""
    counts = {a: algorithms.count(a) for a in dict.fromkeys(algorithms)}
    parts = [f"{a} for {k} bucket{'s' * (k > 1)}" for a, k in counts.items()]
    return ", ".join(parts)


def _mb(values: list[float]) -> str:
    return "/".join(f"{v / 1e6:.3f}" for v in values)
