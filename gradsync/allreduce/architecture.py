"""The All-Reduce architecture behind the trainer's interface: every rank is a worker, and
:class:`~gradsync.allreduce.DataParallel` averages the gradients while backward runs. The
baselines that benchmarks compare it with (torch's DDP, one process alone) live here too."""

from __future__ import annotations

import logging

from .. import comm
from ..checkpoint.protocol import commit_agreed
from ..compress.spec import Compression, make_hook, parse
from .data_parallel import DataParallel

log = logging.getLogger(__name__)


class AllReduceArchitecture:
    """Every process is a worker; gradients are averaged by :class:`gradsync.DataParallel`.

    ``topology``: "probe", "off", a topology file or a :class:`~gradsync.comm.Topology` of
    the first generation's ranks. Elastic training (:meth:`regroup`) restricts it to the
    members of each generation (``members``: their ranks in the first generation)."""

    name = "allreduce"
    is_worker = True
    committer = 0
    replicated = True

    def __init__(self, group: comm.Group, *, algorithm: str = "auto",
                 bucket_cap_mb: float = 25.0, nonfinite: str = "error",
                 topology: "str | comm.Topology | None" = "probe",
                 compression: "Compression | str" = "none", compression_warmup: int = 0,
                 warmup_compression: str = "none"):
        self.group = group
        self.worker_rank = group.rank
        self.num_workers = group.size
        self.eval_group = group
        self.checkpoint_tag = self.name
        self.algorithm, self.bucket_cap_mb, self.nonfinite = algorithm, bucket_cap_mb, nonfinite
        # "off" ignores the network; "probe" measures it; else a topology (file).
        self.topology = None if topology == "off" else topology
        self.compression, self.compression_warmup = parse(compression), compression_warmup
        self.warmup_compression = warmup_compression
        self._hook_state = None
        self.model: DataParallel | None = None
        # What earlier generations measured (elastic training rebuilds the wrapper).
        self._done_wait = self._done_compress = 0.0
        self._done_bytes = self._done_skipped = self._done_shm = self._done_steps = 0
        self._shm_start = 0  # bytes_shm() when the loop began (after the start-up broadcast)
        self._module = None

    @classmethod
    def from_config(cls, config, group: comm.Group, links=None) -> "AllReduceArchitecture":
        """From a TrainConfig (--algorithm, --bucket-cap-mb, --topology, --compression ...);
        ``links`` are not needed: DataParallel probes the group (or reads --topology).
        ``--zero N`` hands over to gradsync/zero/architecture.py (ShardedDataParallel)."""
        if config.allreduce.zero:
            from ..zero.architecture import ZeroArchitecture

            return ZeroArchitecture.from_config(config, group, links)
        return cls(group, algorithm=config.allreduce.algorithm,
                   bucket_cap_mb=config.allreduce.bucket_cap_mb,
                   nonfinite=config.optim.on_nonfinite, topology=config.allreduce.topology,
                   compression=config.compression.spec,
                   compression_warmup=config.compression.compression_warmup,
                   warmup_compression=config.compression.warmup_compression)

    def _wrap(self, module, members: list[int] | None = None) -> DataParallel:
        """Wrap ``module`` in DataParallel over ``self.group`` with the comm hook
        (collective on the group)."""
        self.model = DataParallel(module, group=self.group, algorithm=self.algorithm,
                                  bucket_cap_mb=self.bucket_cap_mb, nonfinite=self.nonfinite,
                                  topology=_members_topology(self.topology, members))
        hook = make_hook(self.compression, self.group, self.compression_warmup,
                         algorithm=self.algorithm, warmup_compression=self.warmup_compression)
        if hook is not None:
            self._hook_state = hook[0]
            self.model.register_comm_hook(*hook)
        return self.model

    def prepare(self, model, make_optimizer, start_step=0):
        wrapped = self._wrap(model)
        self._shm_start = self.bytes_shm()
        return wrapped, make_optimizer(self.model.parameters())

    def serve(self, model, make_optimizer, save=None, restored=None):
        raise RuntimeError("every rank of the All-Reduce architecture is a worker")

    def release(self) -> None:
        """Elastic training: drop the wrapper and every reference to its group (whose
        connections close only with the last one), keeping the module; idempotent."""
        old = self.model
        if old is None:
            return
        self._module = old.module
        self._done_wait += old.stats.comm_wait_s
        self._done_skipped += old.stats.skipped_steps
        for handle in old._handles:  # its post-accumulate-grad hooks on the parameters
            handle.remove()
        old._works = []  # (a failed step leaves its handles there)
        self._done_bytes += self.group.stats.bytes_sent
        self._done_shm += _shm_bytes(self.group)
        self._done_steps += old.stats.sync_steps
        if self._hook_state is not None:
            self._done_compress += self._hook_state.stats.compress_s
        self.model = self._hook_state = None

    def regroup(self, group: comm.Group, module=None, members: list[int] | None = None
                ) -> "DataParallel":
        """Elastic training: average over ``group`` (a new generation) from now on. The
        module (``module`` the first time) and its optimizer stay; the wrapper, its buckets
        and hooks are rebuilt (collective on ``group``; a comm hook's state, e.g. error
        feedback, starts afresh). ``members``: each group rank's rank in the first
        generation, for the topology."""
        self.release()
        self.group, self.worker_rank, self.num_workers = group, group.rank, group.size
        self.eval_group = group
        return self._wrap(module if module is not None else self._module, members)

    def commit_checkpoint(self, step, commit, written=True):
        commit_agreed(self.group, step, commit, written)  # the same as a script's

    def comm_wait_s(self) -> float:
        return self._done_wait + (self.model.stats.comm_wait_s if self.model is not None
                                  else 0.0)

    def bytes_sent(self) -> int:
        return self._done_bytes + self.group.stats.bytes_sent

    def bytes_shm(self) -> int:
        """Bytes this rank has moved through shared memory so far (the shm algorithm's
        buckets: a one-host run sends nothing over the network)."""
        return self._done_shm + _shm_bytes(self.group)

    def compress_s(self) -> float:
        return self._done_compress + (self._hook_state.stats.compress_s
                                      if self._hook_state is not None else 0.0)

    def finish(self) -> dict:
        if self.model is None:
            return {"algorithm": self.algorithm, "nonfinite_skipped": 0}
        steps = self._done_steps + self.model.stats.sync_steps
        out = {"algorithm": self.algorithm,
               "nonfinite_skipped": self._done_skipped + self.model.stats.skipped_steps,
               "bucket_algorithms": self.model.bucket_algorithms,
               "shm_bytes_per_step_per_worker": (self.bytes_shm() - self._shm_start)
               / max(steps, 1)}
        if self._hook_state is not None:
            stats = self._hook_state.stats
            out.update(compression=str(self.compression), compression_ratio=stats.ratio,
                       compress_s=self.compress_s(), bucket_algorithms=None)
        return out

    def summary_head(self, s: dict) -> str:
        return f"allreduce, algorithm {s['algorithm']}" + (
            f" ({_buckets(s['bucket_algorithms'])})" if s.get("bucket_algorithms") else "")

    def summary_lines(self, s: dict) -> list[str]:
        return []


class BaselineArchitecture(AllReduceArchitecture):
    """Baselines for benchmarks: torch's own DDP (``ddp``), or no wrapper at all on a single
    process (``local``)."""

    HEADS = {"ddp": "baseline: torch DistributedDataParallel",
             "local": "baseline: one process, no wrapper"}

    def __init__(self, name: str, group: comm.Group, *, bucket_cap_mb: float = 25.0,
                 compression: "Compression | str" = "none", compression_warmup: int = 0,
                 algorithm: str = "auto"):
        self.name = name  # (before the base class reads it as the checkpoint tag)
        super().__init__(group, bucket_cap_mb=bucket_cap_mb, algorithm=algorithm,
                         compression=compression, compression_warmup=compression_warmup)
        if name == "local" and group.size != 1:
            raise ValueError(f"--arch local trains one process alone; the world has {group.size}")

    @classmethod
    def from_config(cls, config, group: comm.Group, links=None) -> "BaselineArchitecture":
        return cls(config.arch, group, bucket_cap_mb=config.allreduce.bucket_cap_mb,
                   compression=config.compression.spec,
                   compression_warmup=config.compression.compression_warmup,
                   algorithm=config.allreduce.algorithm)

    def summary_head(self, s: dict) -> str:
        return self.HEADS[self.name]

    def prepare(self, model, make_optimizer, start_step=0):
        if self.name == "ddp":
            # torch's own hooks, for comparison: PowerSGD starts after the warm-up steps
            # (torch needs at least 2, since DDP rebuilds its buckets after step 1).
            model = comm.reference.torch_ddp(model, self.group, self.bucket_cap_mb,
                                             str(self.compression),
                                             max(2, self.compression_warmup))
        return model, make_optimizer(model.parameters())

    def comm_wait_s(self) -> float:
        return 0.0  # DDP's waits happen inside backward, out of sight

    def bytes_sent(self) -> int | None:
        return None if self.name == "ddp" else 0  # DDP's traffic is not visible to gradsync


def _members_topology(topology, members: list[int] | None):
    """``topology`` for a generation whose group rank i was rank ``members[i]`` of the first
    generation: a topology of the first generation restricted to the members and renumbered
    (None, with a warning, when a member is on none of its hosts: a replacement); "probe" and
    None pass through (a probe measures the group it runs on)."""
    if members is None or topology is None or topology == "probe":
        return topology
    if not isinstance(topology, comm.Topology):
        topology = comm.Topology.load(topology)
    hosts = []
    for host in topology.hosts:
        ranks = tuple(i for i, m in enumerate(members) if m in host.ranks)
        if ranks:
            hosts.append(comm.HostLink(host.name, ranks, host.rate))
    if sum(len(h.ranks) for h in hosts) < len(members):
        log.warning("topology: members %s are on no host of the topology; this generation "
                    "runs without one", [m for m in members if not any(
                        m in h.ranks for h in topology.hosts)])
        return None
    return comm.Topology(tuple(hosts))


def _shm_bytes(group: comm.Group) -> int:
    """The group's shared-memory byte count (0 with a comm that does not count it yet)."""
    return getattr(group.stats, "bytes_shm", 0)


def _buckets(algorithms: list[str]) -> str:
    """'aware for 2 buckets' / 'native for 1 bucket, aware for 2'."""
    counts = {a: algorithms.count(a) for a in dict.fromkeys(algorithms)}
    return ", ".join(f"{a} for {k} bucket{'s' * (k > 1)}" for a, k in counts.items())
