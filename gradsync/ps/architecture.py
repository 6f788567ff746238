"""The Parameter-Server architecture behind the trainer's architecture interface.

Ranks 0..K-1 of the world are servers, the rest workers. A server builds the same model as
the workers (same seed), keeps its shard of the parameters and the optimizer for it, and
serves until the workers are done; a worker trains with a :class:`PSWorker` and a
:class:`RemoteOptimizer`. Evaluation runs on the first worker alone: in async and ssp mode the
workers hold slightly different parameters, and a dropped worker must not stall a collective.

A checkpoint holds each server's shard and optimizer state in that server's own file; the
first worker writes the model it pulled and commits once every server has saved. (A top-k
worker's error-feedback residual is not in it: a resumed run starts it from zero.)
"""

from __future__ import annotations

import logging

from .. import comm
from .compression import check_compression
from .server import ParameterServer, ServerConfig, ServerStats
from .sharding import gather_shard, shard_layout
from .worker import PSWorker, RemoteOptimizer

log = logging.getLogger(__name__)


class PSArchitecture:
    """``nonfinite``: what a server does with a pushed gradient holding NaN or Inf, "error"
    or "skip" (see :class:`ServerConfig`). ``compression``: how workers push, none, fp16,
    bf16 or topk:RATIO (``compression.py``; powersgd is refused with a ValueError), after
    ``compression_warmup`` steps of plain pushes."""

    name = "ps"

    def __init__(self, servers: int, consistency: str, staleness: int, group: comm.Group,
                 max_steps: int | None = None, nonfinite: str = "error",
                 compression: str = "none", compression_warmup: int = 0):
        self.compression = check_compression(compression)  # first: a usage error
        if compression_warmup < 0:
            raise ValueError(f"compression_warmup must be >= 0, not {compression_warmup}")
        self.compression_warmup = compression_warmup
        if group.size <= servers:
            raise ValueError(f"--servers {servers} leaves no worker in a world of {group.size}")
        self.group = group
        self.servers = list(range(servers))
        self.workers = list(range(servers, group.size))
        self.config = ServerConfig(consistency, staleness if consistency == "ssp" else 0,
                                   max_steps, nonfinite, self.compression)
        self.is_worker = group.rank >= servers
        self.worker_rank = group.rank - servers if self.is_worker else -1
        self.num_workers = len(self.workers)
        self.eval_group = None
        self.committer = servers  # the first worker
        self.checkpoint_tag = f"ps ({servers} servers)"  # a checkpoint resumes this layout only
        self.replicated = False
        self.worker: PSWorker | None = None
        self.server_stats: ServerStats | None = None

    def _layout(self, model):
        return shard_layout([p for p in model.parameters() if p.requires_grad],
                            len(self.servers))

    def prepare(self, model, make_optimizer, start_step=0):
        self.worker = PSWorker(model, self._layout(model), self.servers, self.group.rank,
                               self.group, start_step=start_step, compression=self.compression,
                               compression_warmup=self.compression_warmup,
                               num_workers=self.num_workers)
        return self.worker, RemoteOptimizer(self.worker)

    def serve(self, model, make_optimizer, save=None, restored=None) -> ServerStats:
        layout = self._layout(model)
        k = self.group.rank
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        shard = gather_shard(params, layout, k, params[0].new_empty(layout.shard_numel(k)))
        server = ParameterServer(shard, k, self.workers, make_optimizer, self.config, self.group,
                                 save=save)
        if restored is not None:
            server.load_state_dict(restored)
        self.server_stats = server.serve()
        return self.server_stats

    def commit_checkpoint(self, step: int, commit, written: bool = True) -> None:
        if not written:
            return  # the caller raises this worker's own error; the servers see it leave
        complete = self.worker.checkpoint(step)
        if self.group.rank != self.committer:
            return
        if complete:
            commit()
        else:
            log.warning("checkpoint of step %d not committed: a dropped worker's state is "
                        "missing from it; the previous checkpoint stays the newest", step)

    def comm_wait_s(self) -> float:
        return self.worker.comm_wait_s if self.worker is not None else 0.0

    def bytes_sent(self) -> int:
        return self.worker.bytes_pushed if self.worker is not None else 0

    def compress_s(self) -> float:
        return self.worker.compress_s if self.worker is not None else 0.0

    def finish(self) -> dict:
        """After training: collect the servers' statistics for the summary."""
        stats = self.worker.finish()
        steps = max(self.worker.step_count - self.worker.start_step, 1)  # run by this process
        hist = [sum(s.staleness_hist[i] for s in stats) for i in range(len(stats[0].staleness_hist))]
        while len(hist) > 1 and hist[-1] == 0:
            hist.pop()
        return {
            "servers": len(self.servers), "consistency": self.config.consistency,
            "bytes_pushed_per_step_per_worker": self.worker.bytes_pushed / steps,
            # this worker's pushes: what went out against what plain pushes would have sent
            "compression": str(self.compression),
            "compression_ratio": (self.worker.bytes_dense / self.worker.bytes_pushed
                                  if self.worker.bytes_pushed else 1.0),
            "bytes_dense_per_step_per_worker": self.worker.bytes_dense / steps,
            "compress_s": self.worker.compress_s,
            "bytes_pulled_per_step_per_worker": self.worker.bytes_pulled / steps,
            "bytes_received_per_step_per_server": [s.bytes_received / steps for s in stats],
            "bytes_sent_per_step_per_server": [s.bytes_sent / steps for s in stats],
            "server_busy_s": [s.busy_s for s in stats],
            "server_updates": [s.updates for s in stats],
            "max_staleness": max(s.max_staleness for s in stats),
            "staleness_histogram": hist,
            "max_lead": max(s.max_lead for s in stats),
            "rejected_messages": sum(s.rejected for s in stats),
            "nonfinite_skipped": [s.skipped for s in stats],  # per server: updates left out
            "dropped_workers": sorted({w for s in stats for w in s.dropped}),
        }
