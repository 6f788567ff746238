"""The parts of `gradsync train`'s one training loop that every way of running it shares.

    setup = RunSetup.from_config(config)          # workload, batch, learning rate, steps
    log = RunLog(config.output, setup.total, leader=rank0)
    ... for each step: loss = setup.forward_backward(model, x, y); log.step(record)
    summary = summarize(setup, architecture, model, Tally(...), log, wall)

:func:`gradsync.train.trainer.train` runs the loop over a DataLoader with checkpoints;
:mod:`gradsync.train.elastic_run` extends it to a changing membership (its steps come from
:class:`~gradsync.train.elastic.ElasticLoop`, its summary adds the membership changes). Both
set up, record and summarise through this module, so a flag or a summary key means the same
in both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import comm
from ..data import ShardedSampler
from ..workloads import Workload, build_workload, summarize_eval
from .architecture import Architecture
from .config import OutputConfig, TrainConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass
class RunSetup:
    """What a run trains and for how long, the same on every rank (built from the config)."""

    config: TrainConfig
    workload: Workload
    batch: int        # samples per worker per step (at the configured worker count)
    lr: float
    epochs: int

    @classmethod
    def from_config(cls, config: TrainConfig) -> "RunSetup":
        spec = config.workload
        workload = build_workload(spec.workload, seed=spec.seed, hidden=spec.hidden,
                                  dtype=DTYPES[spec.dtype])
        return cls(config, workload, config.optim.batch_size or workload.default_batch_size,
                   config.optim.lr or workload.default_lr,
                   config.optim.epochs or workload.default_epochs)

    def optimizer_for(self, params) -> torch.optim.Optimizer:
        return make_optimizer(self.workload.optimizer, params, self.lr)

    def total_steps(self, steps_per_epoch: int) -> int:
        """--steps, or --epochs passes of ``steps_per_epoch`` steps."""
        steps = self.config.optim.steps
        return steps if steps is not None else self.epochs * steps_per_epoch

    def steps_per_epoch(self, workers: int) -> int:
        """Global batches of ``batch * workers`` samples in one pass over the training set."""
        return math.ceil(len(self.workload.train_set) / (self.batch * workers))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.workload.model.parameters())

    def forward_backward(self, model: torch.nn.Module, x, y, weight: float = 1.0,
                         timeline=None) -> float:
        """One step's forward and backward; the mean loss is scaled by ``weight`` (1 unless
        the ranks' shares of a step differ in size). Returns the unscaled loss. With a
        ``timeline`` (gradsync.observe.Timeline) both are recorded in it."""
        start = time.perf_counter() if timeline is not None else 0.0
        loss = self.workload.loss_fn(model(x), y)
        mid = time.perf_counter() if timeline is not None else 0.0
        (loss * weight if weight != 1.0 else loss).backward()
        value = loss.item()
        if timeline is not None:
            timeline.record("forward", start, mid)
            timeline.record("backward", mid, time.perf_counter())
        return value


class MetricsWriter:
    """metrics.jsonl (one line per step) and summary.json under ``out``, rank 0 only."""

    def __init__(self, out: str | None, enabled: bool, append: bool = False,
                 done: int | None = None):
        self.dir = Path(out) if (out and enabled) else None
        self._file = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "metrics.jsonl"
            if append and done is not None and path.exists():
                _keep_steps_to(path, done)
            # A resumed run (or a later elastic leader) continues the metrics before it.
            self._file = open(path, "a" if append else "w", encoding="utf-8")

    def step(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # readable while the run goes on

    def summary(self, summary: dict) -> None:
        if self.dir is not None:
            write_summary(self.dir, summary)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _keep_steps_to(path: Path, done: int) -> None:
    """Drop the records of steps after ``done`` (a run resumed from an older checkpoint
    redoes them) and a last line cut short by a kill; the file is replaced atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= done:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def write_summary(out: str | Path | None, summary: dict) -> None:
    """``out``/summary.json, replaced atomically (nothing without ``out``)."""
    if out:
        tmp = Path(out) / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(Path(out) / "summary.json")


class RunLog:
    """Every rank's step times and losses; on the leader (the rank that reports), the
    metrics file and the progress bar. An elastic run's leader can change: :meth:`lead`."""

    def __init__(self, output: OutputConfig, total: int):
        self.output, self.total = output, total
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.writer: MetricsWriter | None = None
        self.bar = None
        self.timeline = None  # this rank's gradsync.observe.Timeline (--timeline), flushed per step
        self.scalars = None   # the leader's gradsync.observe.TensorBoardLog (--tensorboard)
        self.stragglers = None  # every worker's gradsync.observe.StragglerWatch (collective)

    def lead(self, done: int, append: bool) -> None:
        """This rank reports from now on; ``done`` steps are behind (the bar starts there)."""
        if self.writer is not None:
            return
        self.writer = MetricsWriter(self.output.out, True, append=append, done=done)
        if self.output.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, leave=True)
            self.bar.update(done)

    def step(self, record: dict, **postfix) -> None:
        self.step_times.append(record["step_time_s"])
        self.losses.append(record["loss"])
        if self.timeline is not None:
            self.timeline.flush()
        if self.stragglers is not None:
            self.stragglers.step(record)
        if self.writer is not None:
            self.writer.step(record)
        if self.scalars is not None:
            self.scalars.step(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                                 **postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.timeline is not None:
            self.timeline.close()


def loader_of(dataset, batch_size: int, sampler) -> DataLoader:
    """A DataLoader over ``sampler`` that never draws from torch's global generator.

    Each iteration of a DataLoader draws a base seed; from the global generator, that draw
    would shift the stream dropout reads, and a run resumed mid-epoch (which starts one more
    iteration than the straight run) would no longer equal it bit for bit."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      generator=torch.Generator())


def evaluate(model: torch.nn.Module, workload: Workload, group: comm.Group | None,
             batch_size: int) -> dict[str, float]:
    """Exact evaluation: every held-out sample is seen once across the ranks of ``group``
    (or by this rank alone when ``group`` is None), and their sums are added."""
    replicas, rank = (group.size, group.rank) if group is not None else (1, 0)
    sampler = ShardedSampler(workload.eval_set, replicas, rank, eval_mode=True)
    loader = loader_of(workload.eval_set, batch_size, sampler)
    sums = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            sums += workload.eval_sums(model(x), y)
    model.train()
    if group is not None:
        comm.all_reduce(sums, op="sum", group=group, algorithm="native")
    return summarize_eval(workload, sums)


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter's bytes, in the order of ``named_parameters``."""
    digest = hashlib.sha1()
    for _, p in model.named_parameters():
        digest.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Tally:
    """Where a run ended and what it cost this rank, for :func:`summarize`."""

    step: int
    epoch: int
    steps_run: int          # steps this process ran (after a resume: since it)
    global_batch: int       # samples per step, all workers together
    lr: float
    waited_s: float         # this rank's time waiting on communication during the loop
    sent: int | None        # bytes this rank sent during the loop (None: not known)


def summarize(setup: RunSetup, arch: Architecture, model: torch.nn.Module, tally: Tally,
              log: RunLog, wall: float) -> dict:
    """The summary every worker computes (collective on ``arch.eval_group``): the same
    figures on each, the architecture's own after the common ones."""
    extra = arch.finish()
    recent = statistics.fmean(log.losses[-20:]) if log.losses else float("nan")
    # This rank's share of the loop spent waiting; shares (not seconds) are averaged over the
    # ranks, so the split of the summary adds up to its wall time on every rank.
    share = min(max(tally.waited_s, 0.0) / wall, 1.0) if wall > 0 else 0.0
    tail = torch.tensor([recent, share], dtype=torch.float64)
    group = arch.eval_group
    if group is not None:
        comm.all_reduce(tail, op="avg", group=group, algorithm="native")
    evaluation = (evaluate(model, setup.workload, group, setup.batch)
                  if (group is not None or arch.worker_rank == 0) else {})
    workers, times, done = arch.num_workers, log.step_times, max(tally.steps_run, 1)
    return {
        "workload": setup.config.workload.workload, "arch": arch.name,
        "algorithm": setup.config.allreduce.algorithm,
        "workers": workers, "parameters": setup.parameters, "steps": tally.step,
        "epochs": tally.epoch, "steps_run": tally.steps_run,
        "batch_per_worker": tally.global_batch // workers, "global_batch": tally.global_batch,
        "lr": tally.lr, "train_loss": tail[0].item(),
        **{f"eval_{k}": v for k, v in evaluation.items()},
        "wall_s": wall, "samples_per_s": tally.steps_run * tally.global_batch / wall,
        "step_time_ms_median": 1e3 * statistics.median(times or [0.0]),
        # Throughput of a typical step: free of start-up and of the first, slow steps.
        "samples_per_s_median_step": tally.global_batch / statistics.median(times)
        if times else 0.0,
        "comm_wait_s": tail[1].item() * wall, "compute_s": (1 - tail[1].item()) * wall,
        "bytes_per_step_per_worker": None if tally.sent is None else tally.sent / done,
        # Runs that must agree to the bit (another algorithm, another network) compare this.
        "parameters_sha1": parameters_digest(model),
        # starts of the whole run before this one (torchrun's count; gradsync's launcher sets
        # it for `--arch ps --elastic --max-restarts`)
        "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), **extra,
    }
