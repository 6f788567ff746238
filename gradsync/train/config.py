"""The typed configuration of `gradsync train`, one small dataclass per concern.

Each section validates its own fields in ``__post_init__``; :class:`TrainConfig` holds the
sections and checks what spans them. The flags are derived from the fields (flat:
``--servers``, ``--checkpoint-dir``; grouped by section in ``--help``), so a new concern
(compression, an engine, elastic training, serving) is one new section here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..comm import ALL_REDUCE_ALGORITHMS, ENGINES, Topology, check_algorithm
from ..compress.spec import COMPRESSORS, REGISTRY as COMPRESSOR_TABLE, Compression
from ..compress.spec import WARMUP_COMPRESSIONS, check_warmup_compression
from ..compress.spec import parse as parse_compression
from ..flags import at_least as _at_least
from ..flags import flag_meta as _help
from ..lab.netns import check_rates
from ..ps.consistency import MODES
from ..ps.sharding import LAYOUTS
from ..workloads import WORKLOADS
from ..zero.architecture import check_zero
from .architecture import ARCH_HELP, AUTO, check_architecture, check_auto
from .observe_config import ObserveConfig

CONSISTENCY_MODES = tuple(MODES)
PS_LAYOUTS = tuple(LAYOUTS)
# Upper bounds of the positive float flags: beyond them a value is a typo, not a setting
# (a learning rate of 1e300 turns the first update into Inf; a timeout beyond a week
# overflows the engine's timedelta long before it helps anyone).
LR_MAX, TIMEOUT_MAX_S, BUCKET_MAX_MB = 1e3, 7 * 24 * 3600.0, float(1 << 20)


def _positive(value: float | None, most: float, flag: str) -> None:
    if value is not None and not 0 < value <= most:  # (also false for NaN)
        raise ValueError(f"--{flag} must be a positive number up to {most:g}, got {value}")


@dataclass
class WorkloadConfig:
    """What to train."""

    workload: str = field(default="digits-mlp", metadata=_help(
        f"what to train: {', '.join(WORKLOADS)}"))
    hidden: int = field(default=1024, metadata=_help(
        "hidden width of synthetic-mlp and digits-wide"))
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=_help(
        "parameter and data type"))
    seed: int = field(default=0, metadata=_help("seed for the model and the data order"))

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of "
                             f"{', '.join(WORKLOADS)}")
        _at_least(self.hidden, 1, "hidden")


@dataclass
class OptimConfig:
    """How long and how fast: steps, batch, learning rate."""

    epochs: int | None = field(default=None, metadata=_help("passes over the training data "
                                                            "(default: the workload's)"))
    steps: int | None = field(default=None, metadata=_help("stop after this many steps "
                                                           "(overrides --epochs)"))
    batch_size: int | None = field(default=None, metadata=_help(
        "samples per worker per step (default: the workload's)"))
    lr: float | None = field(default=None, metadata=_help("learning rate (default: the "
                                                          "workload's)"))
    on_nonfinite: Literal["error", "skip"] = field(default="error", metadata=_help(
        "a NaN or Inf gradient: stop the run naming the rank and step (error), or skip "
        "that step's update (skip)"))

    def __post_init__(self) -> None:
        for name in ("epochs", "steps", "batch_size"):
            _at_least(getattr(self, name), 1, name.replace("_", "-"))
        _positive(self.lr, LR_MAX, "lr")


@dataclass
class AllReduceConfig:
    """All-Reduce architecture."""

    algorithm: str = field(default="auto", metadata=_help(
        f"all-reduce algorithm: {', '.join(ALL_REDUCE_ALGORITHMS)}"))
    bucket_cap_mb: float = field(default=25.0, metadata=_help("gradient bucket size (MiB)"))
    topology: str = field(default="probe", metadata=_help(
        "the hosts and links auto takes into account: probe (measure them when the ranks "
        "span several hosts), off, or a JSON file from `gradsync bench topology --save`"))
    zero: Literal[0, 1, 2, 3] = field(default=0, metadata=_help(
        "ZeRO stage (docs/zero.md): shard the optimizer state (1), also the gradients (2), "
        "also the parameters (3) across the workers; 0: off"))

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        _positive(self.bucket_cap_mb, BUCKET_MAX_MB, "bucket-cap-mb")
        if self.topology not in ("probe", "off"):
            Topology.load(self.topology)  # a TopologyError (a ValueError) names the problem


@dataclass
class CompressionConfig:
    """Gradient compression (--arch allreduce: a comm hook; --arch ps: compressed pushes)."""

    compression: str = field(default="none", metadata=_help(
        f"{', '.join(COMPRESSORS)} (top-k keeps error feedback, e.g. topk:0.01; "
        f"{', '.join(n for n, c in COMPRESSOR_TABLE.items() if not c.ps)}: all-reduce only)"))
    compression_warmup: int = field(default=0, metadata=_help(
        "steps sent uncompressed before compression starts"))
    warmup_compression: Literal[WARMUP_COMPRESSIONS] = field(default="none", metadata=_help(
        "what the --compression-warmup steps send: none (the gradients as they are), fp16 or "
        "bf16 (half the bytes; --arch allreduce)"))

    def __post_init__(self) -> None:
        # Parsed once, here; the object travels to the hooks, the PS workers and servers.
        self._spec = parse_compression(self.compression)  # a ValueError names what is wrong
        _at_least(self.compression_warmup, 0, "compression-warmup")
        check_warmup_compression(self.warmup_compression)
        if self.warmup_compression != "none" and (self.compression_warmup == 0
                                                  or self._spec.name == "none"):
            raise ValueError(f"--warmup-compression {self.warmup_compression} casts the "
                             "--compression-warmup steps before a compressor starts: it needs "
                             "--compression and --compression-warmup N > 0")

    @property
    def spec(self) -> Compression:
        """``compression`` parsed (the one parse of the run)."""
        return self._spec


@dataclass
class PSConfig:
    """Parameter-Server architecture."""

    servers: int = field(default=1, metadata=_help("parameter servers (--arch ps); the first "
                                                   "ranks of the world serve"))
    consistency: Literal[CONSISTENCY_MODES] = field(default="sync", metadata=_help(
        f"parameter-server consistency: {', '.join(CONSISTENCY_MODES)} (ssp: bounded "
        "staleness)"))
    staleness: int = field(default=2, metadata=_help("ssp: how many steps a worker may run "
                                                     "ahead of the slowest"))
    partition_mb: float | None = field(default=None, metadata=_help(
        "largest partition of a shard (MiB), the unit a worker pushes and pulls while the "
        "others are in flight (default: about 5 ms of the slowest known link, less where "
        "the pushes heading into one host at once would not fit 15 ms of it; 1 MiB if no "
        "link is known)", flag="ps-partition-mb"))
    layout: Literal[PS_LAYOUTS] = field(default="striped", metadata=_help(
        "how the partitions are dealt to the servers: striped (in turn, so every layer's "
        "gradients reach every server as backward produces them) or contiguous (server k "
        "holds the k-th range; checkpoints written before striped resume with it)",
        flag="ps-layout"))
    server_ranks: str | None = field(default=None, metadata=_help(
        "which ranks serve: a list like 0,2,4 (as many as --servers), or 'colocated' (the "
        "first rank of each host); GRADSYNC_ROLE=server|worker on every rank overrides "
        "(default: the first --servers ranks)"))

    def __post_init__(self) -> None:
        _at_least(self.servers, 1, "servers")
        _at_least(self.staleness, 0, "staleness")
        _positive(self.partition_mb, BUCKET_MAX_MB, "ps-partition-mb")
        if self.server_ranks is not None:
            from ..ps.placement import parse_server_ranks

            ranks = parse_server_ranks(self.server_ranks)  # a ValueError names what is wrong
            if ranks != "colocated" and len(ranks) != self.servers:
                raise ValueError(f"--server-ranks lists {len(ranks)} ranks but --servers is "
                                 f"{self.servers}; pass --servers {len(ranks)}")


@dataclass
class CheckpointConfig:
    """Checkpoints."""

    dir: str | None = field(default=None, metadata=_help(
        "directory for checkpoints (atomic; see docs/reliability.md)", flag="checkpoint-dir"))
    every: int | None = field(default=None, metadata=_help(
        "save a checkpoint every this many steps", flag="checkpoint-every"))
    keep: int = field(default=3, metadata=_help("committed checkpoints to keep"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest valid checkpoint in --checkpoint-dir"))
    overwrite: bool = field(default=False, metadata=_help(
        "start afresh in a --checkpoint-dir that holds checkpoints, removing them (all of "
        "them, any workload's; needs --checkpoint-every)"))

    def __post_init__(self) -> None:
        _at_least(self.every, 1, "checkpoint-every")
        _at_least(self.keep, 1, "keep")
        if (self.every is not None or self.resume or self.overwrite) and not self.dir:
            raise ValueError("--checkpoint-every, --resume and --overwrite need --checkpoint-dir")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the checkpoints that --overwrite would "
                             "remove; pass one of them")
        if self.overwrite and self.every is None:
            # It would remove every checkpoint in the directory and save none in their place.
            raise ValueError("--overwrite removes the checkpoints in --checkpoint-dir to save "
                             "this run's; without --checkpoint-every it saves none: pass "
                             "--checkpoint-every N, or leave --overwrite out")


@dataclass
class LaunchConfig:
    """Processes and rendezvous."""

    workers: int = field(default=2, metadata=_help("local worker processes (ignored under "
                                                   "torchrun, which sets the world size)"))
    addr: str = field(default="127.0.0.1", metadata=_help("rendezvous address of local runs "
                                                          "(IPv4 or IPv6)"))
    port: int | None = field(default=None, metadata=_help(
        "rendezvous port (default: a free one); --elastic all-reduce runs keep their store in "
        "a private file instead and take no port"))
    timeout: float = field(default=300.0, metadata=_help(
        "seconds any blocking communication may wait before the run fails"))
    engine: Literal[ENGINES] = field(default="auto", metadata=_help(
        f"communication engine: {', '.join(ENGINES)} (torch: gloo; mpi: under mpiexec/srun, "
        "pip install 'gradsync[mpi]'; auto: mpi when started by an MPI launcher)"))
    elastic: bool = field(default=False, metadata=_help(
        "elastic training (--arch allreduce, local workers): a lost worker does not stop the "
        "run, the others go on from the last step they completed; --arch ps: the servers drop "
        "a lost worker and wait for the live ones, or with --max-restarts every rank restarts "
        "from the newest checkpoint (docs/reliability.md)"))
    min_workers: int = field(default=1, metadata=_help(
        "--elastic: stop the run when fewer workers than this are left"))
    max_restarts: int = field(default=0, metadata=_help(
        "--elastic: start up to this many replacement workers, each joining at a step "
        "boundary (--arch ps: restart every rank from the newest checkpoint this many times)"))
    elastic_rescale: Literal["batch", "lr"] = field(default="batch", metadata=_help(
        "--elastic, when the worker count changes: keep the global batch (batch: each "
        "worker's share changes) or each worker's batch, scaling the learning rate (lr)"))
    elastic_check_every: int = field(default=1, metadata=_help(
        "--elastic: look for a joining worker every this many steps (a store read and a "
        "tiny broadcast each time)"))
    rdzv_endpoint: str | None = field(default=None, metadata=_help(
        "--elastic across hosts: HOST:PORT of the job's `gradsync rdzv`, which this host "
        "joins with --workers workers (the service holds --min-workers)"))

    @property
    def drops_lost(self) -> bool:
        """--elastic without --max-restarts: a PS's servers drop a lost worker and go on (with
        restarts nothing is dropped: the run restarts from a checkpoint instead)."""
        return self.elastic and not self.max_restarts

    def __post_init__(self) -> None:
        _at_least(self.workers, 1, "workers")
        if self.rdzv_endpoint is not None:
            from ..net import parse_endpoint

            if not self.elastic:
                raise ValueError("--rdzv-endpoint needs --elastic")
            parse_endpoint(self.rdzv_endpoint, "--rdzv-endpoint")
        _at_least(self.min_workers, 1, "min-workers")
        _at_least(self.max_restarts, 0, "max-restarts")
        _at_least(self.elastic_check_every, 1, "elastic-check-every")
        if self.elastic and self.min_workers > self.workers:
            raise ValueError(f"--min-workers {self.min_workers} is more than --workers "
                             f"{self.workers}")
        _positive(self.timeout, TIMEOUT_MAX_S, "timeout")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")


@dataclass
class LabConfig:
    """Emulated cluster (root; docs/lab.md)."""

    hosts: int | None = field(default=None, metadata=_help(
        "run on N emulated hosts with shaped links, --procs-per-host ranks each; --workers "
        "is then N x procs-per-host, minus the servers", flag="lab"))
    rate: str = field(default="1gbit", metadata=_help("--lab: every link's rate (tc units)"))
    rates: str | None = field(default=None, metadata=_help(
        "--lab: one rate per host, e.g. 1gbit,1gbit,250mbit"))
    procs_per_host: int = field(default=1, metadata=_help(
        "--lab: ranks per host (torchrun's --nproc-per-node): ranks h x P .. h x P + P - 1 "
        "share host h's link; the PS's servers are ranks 0..k-1"))

    def __post_init__(self) -> None:
        _at_least(self.hosts, 1, "lab")
        _at_least(self.procs_per_host, 1, "procs-per-host")
        if self.hosts is None and self.procs_per_host != 1:
            raise ValueError("--procs-per-host needs --lab N")
        check_rates(self.hosts, self.rates)


@dataclass
class OutputConfig:
    """Output."""

    out: str | None = field(default=None, metadata=_help(
        "directory for metrics.jsonl (per step) and summary.json"))
    progress: bool = field(default=True, metadata=_help("show a progress bar on rank 0"))


@dataclass
class TrainConfig:
    """What to train, on how many workers, with which architecture."""

    arch: str = field(default="allreduce", metadata=_help(ARCH_HELP))
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    allreduce: AllReduceConfig = field(default_factory=AllReduceConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    lab: LabConfig = field(default_factory=LabConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)

    @property
    def processes(self) -> int:
        """Local processes to start: the workers, plus the servers of the Parameter Server."""
        return self.launch.workers + (self.ps.servers if self.arch == "ps" else 0)

    def __post_init__(self) -> None:
        check_auto(self) if self.arch == AUTO else check_architecture(self.arch)
        check_zero(self)
        if self.arch == "local" and self.launch.workers != 1:
            raise ValueError(f"--arch local trains one process alone; use --workers 1, "
                             f"not {self.launch.workers}")
        spec = self.compression.spec
        if self.arch == "local" and spec.name != "none":
            raise ValueError("--arch local trains one process alone: nothing to compress")
        if self.arch == "ddp" and not spec.compressor.torch_hook:
            hooks = [n for n, c in COMPRESSOR_TABLE.items() if c.torch_hook and n != "none"]
            raise ValueError(f"--arch ddp runs torch's own hooks: {', '.join(hooks)}; "
                             f"not {spec}")
        if self.launch.elastic and (self.arch not in ("allreduce", "ps") or self.lab.hosts
                                    or self.launch.engine == "mpi"):
            raise ValueError("--elastic is built for --arch allreduce and --arch ps on local "
                             "workers (torch engine), without --lab")
        if self.launch.rdzv_endpoint is not None and (self.arch != "allreduce"
                                                      or self.checkpoint.dir):
            raise ValueError("--rdzv-endpoint (elastic across hosts) is built for --arch "
                             "allreduce without --checkpoint-dir")
        if self.launch.elastic and self.arch != "ps" and self.launch.port is not None:
            raise ValueError("--port is not used by --elastic: the job's store is a private "
                             "file, not a port (docs/reliability.md)")
        if self.launch.elastic and self.arch == "ps" and (
                bool(self.launch.max_restarts) != bool(self.checkpoint.dir)):
            raise ValueError("--arch ps --elastic takes --max-restarts with --checkpoint-dir "
                             "(a loss restarts every rank from the newest checkpoint) or neither "
                             "(a lost worker is dropped, and its state could not be saved)")
        if self.compression.warmup_compression != "none" and self.arch != "allreduce":
            raise ValueError("--warmup-compression is built for --arch allreduce (a cast in "
                             f"its warm-up hook), not --arch {self.arch}")
        if self.arch == "ps" and not spec.compressor.ps:
            raise ValueError(f"--compression {spec.name} is for --arch allreduce (its low-rank "
                             "factors need an all-reduce); the PS takes " + ", ".join(
                                 n for n, c in COMPRESSOR_TABLE.items() if c.ps and n != "none"))
