"""The Parameter-Server architecture behind the trainer's architecture interface.

Some ranks of the world are servers, the rest workers (``placement.py`` says which: by
default ranks 0..K-1, dedicated hosts in a lab of one rank per host; or explicit ranks, a
role per rank, or one server beside each worker). A server builds the same model as the
workers (same seed), keeps its shard of the parameters and the optimizer for it, and serves
until the workers are done; a worker trains with a :class:`PSWorker` and a
:class:`RemoteOptimizer`. Evaluation runs on the first worker alone: in async and ssp mode the
workers hold slightly different parameters, and a dropped worker must not stall a collective.

Shards are cut into partitions of ``partition_mb`` (default: from the slowest link, when the
links are known), dealt out to the servers in turn (``layout="striped"``; "contiguous" gives
server k the k-th range, as gradsync did before; ``sharding.py``) and sized to each server's
link when the links are unequal (a topology file, or the lab's links).

A checkpoint holds each server's shard and optimizer state in that server's own file; the
first worker writes the model it pulled and commits once every server has saved. (A top-k
worker's error-feedback residual is not in it: a resumed run starts it from zero.)
"""

from __future__ import annotations

import logging

from .. import comm
from .compression import check_compression
from .consistency import MODES
from .placement import fan_in, link_topology, server_weights, slowest_rate
from .placement import server_ranks as resolve_servers
from .remote_optimizer import RemoteOptimizer
from .server import ParameterServer, ServerConfig, ServerStats
from .sharding import LAYOUTS, gather_part, partition_bytes_for, shard_layout
from .trace import ServerTrace
from .worker import PSWorker

log = logging.getLogger(__name__)


class PSArchitecture:
    """``nonfinite``: what a server does with a pushed gradient holding NaN or Inf, "error"
    or "skip" (see :class:`ServerConfig`). ``compression``: how workers push, none, fp16,
    bf16 or topk:RATIO (``compression.py``; powersgd is refused with a ValueError), after
    ``compression_warmup`` steps of plain pushes. ``server_ranks``: which ranks serve (see
    ``placement.py``; None: ranks 0..servers-1). ``partition_mb``: the largest partition in
    MiB (None: chosen from the links). ``layout``: "striped" or "contiguous"
    (``sharding.LAYOUTS``). ``topology``: a :class:`~gradsync.comm.Topology` or a
    topology file, for the links' rates (None: not known). ``elastic``: a lost
    worker is dropped in sync mode too, until fewer than ``min_workers`` are left (see
    :class:`ServerConfig`)."""

    name = "ps"

    def __init__(self, servers: int, consistency: str, staleness: int, group: comm.Group,
                 max_steps: int | None = None, nonfinite: str = "error",
                 compression: str = "none", compression_warmup: int = 0, *,
                 server_ranks: str | list[int] | None = None,
                 partition_mb: float | None = None, layout: str = "striped", topology=None,
                 elastic: bool = False, min_workers: int = 1):
        self.compression = check_compression(compression)  # first: a usage error
        if compression_warmup < 0:
            raise ValueError(f"compression_warmup must be >= 0, not {compression_warmup}")
        if partition_mb is not None and not partition_mb > 0:
            raise ValueError(f"partition_mb must be positive, not {partition_mb}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        self.layout = layout
        self.compression_warmup = compression_warmup
        if group.size <= servers:
            raise ValueError(f"--servers {servers} leaves no worker in a world of {group.size}")
        self.group = group
        self.servers = resolve_servers(group, servers, server_ranks)
        # Replies travel on connections of their own. Gloo sends a message only once the
        # receiver has posted its receive, and says so on the reverse direction of the same
        # connection: on one connection a server's "ready for your next push" would queue
        # behind the megabytes of replies already in the socket, and pushes would stall
        # (measured: a 16 MiB push+pull at 1.8x S/B). Only a group of the whole world can
        # be duplicated here (every process must join new_group); a sub-group shares one.
        self.reply_group = (comm.new_group(list(range(group.size)))
                            if comm.is_initialized() and group.size == comm.world().size
                            else group)
        if self.reply_group is not group:
            # A rank returns from the group's set-up once its own connections are up; one
            # that then fails at once (a malformed first push) and exits would cut a slower
            # peer's set-up short with gloo's "connection closed by peer" (seen once in CI).
            comm.barrier(self.reply_group)
        self.workers = [r for r in range(group.size) if r not in self.servers]
        self.config = ServerConfig(consistency, staleness if MODES[consistency].bounded else 0,
                                   max_steps, nonfinite, self.compression,
                                   elastic=elastic, min_workers=min_workers)
        self.is_worker = group.rank not in self.servers
        self.worker_rank = self.workers.index(group.rank) if self.is_worker else -1
        self.num_workers = len(self.workers)
        self.eval_group = None
        self.committer = self.workers[0]  # the first worker
        # A checkpoint resumes this layout only; a contiguous one keeps the tag checkpoints
        # had before the striped layout, which resume with --ps-layout contiguous.
        self.checkpoint_tag = (f"ps ({servers} servers)" if layout == "contiguous" else
                               f"ps ({servers} servers, {layout} layout)")
        self.replicated = False
        self.worker: PSWorker | None = None
        self.server_stats: ServerStats | None = None
        self.timeline = None  # a server's --timeline (set_timeline); a worker's is its PSWorker's
        links = link_topology(topology, group.size)
        self.weights = server_weights(links, self.servers)  # per server, its share of bytes
        pushes = fan_in(links.host_of if links else None, self.servers, self.workers)
        self.partition_bytes = (int(partition_mb * (1 << 20)) if partition_mb is not None
                                else partition_bytes_for(slowest_rate(links), pushes))

    @classmethod
    def from_config(cls, config, group: comm.Group, links: comm.Topology | None = None
                    ) -> "PSArchitecture":
        """From a TrainConfig; ``links``: the run's links when the caller knows them (a lab's),
        used unless --topology names a file."""
        topology = config.allreduce.topology
        return cls(config.ps.servers, config.ps.consistency, config.ps.staleness, group,
                   nonfinite=config.optim.on_nonfinite, compression=config.compression.spec,
                   compression_warmup=config.compression.compression_warmup,
                   server_ranks=config.ps.server_ranks, partition_mb=config.ps.partition_mb,
                   layout=config.ps.layout,
                   topology=topology if topology not in ("probe", "off") else links,
                   elastic=config.launch.drops_lost, min_workers=config.launch.min_workers)

    def _layout(self, model):
        return shard_layout([p for p in model.parameters() if p.requires_grad],
                            len(self.servers), weights=self.weights,
                            partition_bytes=self.partition_bytes, layout=self.layout)

    def prepare(self, model, make_optimizer, start_step=0):
        self.worker = PSWorker(model, self._layout(model), self.servers, self.group.rank,
                               self.group, start_step=start_step, compression=self.compression,
                               compression_warmup=self.compression_warmup,
                               num_workers=self.num_workers, reply_group=self.reply_group)
        return self.worker, RemoteOptimizer(self.worker)

    def set_timeline(self, timeline) -> None:
        """A server rank records each partition's update in ``timeline`` (``trace.py``)."""
        self.timeline = timeline

    def serve(self, model, make_optimizer, save=None, restored=None) -> ServerStats:
        layout = self._layout(model)
        k = self.servers.index(self.group.rank)
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        parts = [gather_part(params, layout, part, params[0].new_empty(part.numel,
                                                                       dtype=part.dtype))
                 for part in layout.parts(k)]
        server = ParameterServer(parts, k, self.workers, make_optimizer, self.config, self.group,
                                 save=save, reply_group=self.reply_group)
        if self.timeline is not None:
            server.trace = ServerTrace(self.timeline, k, [p.nbytes for p in layout.parts(k)])
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
            "server_ranks": list(self.servers),
            "partitions_per_server": [len(self.worker.layout.parts(k))
                                      for k in range(len(self.servers))],
            "partition_bytes": self.partition_bytes,
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
            "workers_dropped": len({w for s in stats for w in s.dropped}),
        }

    def summary_head(self, s: dict) -> str:
        return f"ps, {s.get('servers')} servers, {s.get('consistency')}"

    def summary_lines(self, s: dict) -> list[str]:
        lines = [f"  servers            received {_mb(s['bytes_received_per_step_per_server'])} "
                 f"MB and sent {_mb(s['bytes_sent_per_step_per_server'])} MB per step; busy "
                 f"{', '.join(f'{b:.2f}' for b in s['server_busy_s'])} s",
                 f"  staleness          max {s['max_staleness']}, histogram "
                 f"{s['staleness_histogram']}, max lead {s['max_lead']} steps"]
        if s["dropped_workers"]:
            lines.append(f"  dropped workers    ranks {s['dropped_workers']} (lost during the "
                         f"run; the others went on)")
        return lines


def _mb(values: list[float]) -> str:
    return "/".join(f"{v / 1e6:.3f}" for v in values)
