"""``--tensorboard DIR``: rank 0's per-step scalars in TensorBoard's event format.

Written with ``torch.utils.tensorboard.SummaryWriter`` (it needs the ``tensorboard``
package) into ``DIR/<Mon07_05-40-12_host>``, the directory torch and Keras name a run by,
so that several runs under one DIR show as separate runs of ``tensorboard --logdir DIR``.

Tags (x axis: the step, numbered as in metrics.jsonl):
    train/loss, train/lr, perf/samples_per_s, time/step_s, time/compute_s, time/wait_s,
    time/compress_s, comm/bytes_per_step; at the last step eval/accuracy, eval/loss
    (eval/perplexity for text) and comm/compression_ratio when compressing.
"""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path

# The counters of metrics.jsonl that add up over the run; a step's own value is the difference.
_COUNTERS = ("comm_wait_s", "bytes_sent", "compress_s")


def run_dir(root: str | Path) -> Path:
    """``root``/<date_host>: where a run started now writes (torch's default name)."""
    return Path(root) / f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"


class TensorBoardLog:
    """Per-step scalars of rank 0 (see the module docstring for the tags).

    Args:
        root: the ``--tensorboard`` directory; the run writes into :func:`run_dir` of it.
        global_batch: samples per step, all workers together.
        lr: the learning rate (constant in gradsync train).
    Raises:
        ImportError: the ``tensorboard`` package is missing (``pip install tensorboard``).
    """

    def __init__(self, root: str | Path, global_batch: int, lr: float):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's module imports tensorboard at import time
            raise ImportError("--tensorboard needs the tensorboard package: pip install "
                              "tensorboard") from exc
        self.dir = run_dir(root)
        # flush_secs: a run killed midway loses at most this much of its curves.
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=5)
        self.global_batch, self.lr = global_batch, lr
        self._last = dict.fromkeys(_COUNTERS, 0.0)
        self.step_n = 0

    def step(self, record: dict) -> None:
        """One line of metrics.jsonl (cumulative counters since the loop began)."""
        n, add = record["step"], self.writer.add_scalar
        delta = {k: record.get(k, 0.0) - self._last[k] for k in _COUNTERS}
        self._last = {k: record.get(k, 0.0) for k in _COUNTERS}
        step_s, wait = record["step_time_s"], min(max(delta["comm_wait_s"], 0.0),
                                                  record["step_time_s"])
        add("train/loss", record["loss"], n)
        add("train/lr", self.lr, n)
        add("perf/samples_per_s", self.global_batch / step_s if step_s > 0 else 0.0, n)
        add("time/step_s", step_s, n)
        add("time/compute_s", step_s - wait, n)
        add("time/wait_s", wait, n)
        add("time/compress_s", delta["compress_s"], n)
        add("comm/bytes_per_step", delta["bytes_sent"], n)
        self.step_n = n

    def finish(self, summary: dict) -> None:
        """The run's evaluation (and compression ratio) at its last step; closes the files."""
        n = summary.get("steps", self.step_n)
        for key in ("accuracy", "loss", "perplexity"):
            if f"eval_{key}" in summary:
                self.writer.add_scalar(f"eval/{key}", summary[f"eval_{key}"], n)
        if summary.get("compression_ratio") is not None:
            self.writer.add_scalar("comm/compression_ratio", summary["compression_ratio"], n)
        self.writer.close()
