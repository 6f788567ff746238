"""The typed configuration of `gradsync run`: torchrun's flags, then gradsync's own.

The flags are derived from these fields (gradsync/flags.py), so their names are torchrun's:
``--nproc-per-node``, ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``,
``--max-restarts``, ``--log-dir``, ``--redirects``, ``--tee`` (torchrun's underscore spellings,
``--nproc_per_node``, are accepted too: see :func:`gradsync.run.cli.normalize_argv`), and
horovodrun's (``-np``, ``-H``, ...: horovodrun.py maps them onto these).
Validation is here, one line per mistake, before anything starts. No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..flags import at_least as _at_least
from ..flags import flag_meta as _help
from ..lab.netns import check_rates
from .horovodrun import HorovodRunConfig

PORT_MAX = 65535
STREAMS = (0, 1, 2, 3)  # torchrun's codes: none, stdout, stderr, both


@dataclass
class ElasticRunConfig:
    """Elastic (a lost worker does not stop the others; docs/reliability.md)."""

    elastic: bool = field(default=False, metadata=_help(
        "survive the loss of a worker: the launcher hosts the rendezvous store, the script "
        "uses gradsync.elastic"))
    min_workers: int | None = field(default=None, metadata=_help(
        "--elastic: the fewest workers the run goes on with (default: 1)"))
    rdzv_endpoint: str | None = field(default=None, metadata=_help(
        "--elastic across hosts: HOST:PORT of the job's `gradsync rdzv`, which this host "
        "joins with --nproc-per-node workers"))

    def __post_init__(self) -> None:
        _at_least(self.min_workers, 1, "min-workers")
        if self.min_workers is not None and not self.elastic:
            raise ValueError("--min-workers needs --elastic")
        if self.rdzv_endpoint is None:
            return
        if not self.elastic:
            raise ValueError("--rdzv-endpoint needs --elastic")
        if self.min_workers is not None:
            raise ValueError("--min-workers of a job across hosts is its service's: "
                             "`gradsync rdzv --min-workers K`")
        from ..net import parse_endpoint

        parse_endpoint(self.rdzv_endpoint, "--rdzv-endpoint")


@dataclass
class RunLabConfig:
    """Emulated cluster (root; docs/lab.md)."""

    hosts: int | None = field(default=None, metadata=_help(
        "run on N emulated hosts with shaped links (network namespaces)", flag="lab"))
    rate: str = field(default="1gbit", metadata=_help("--lab: every link's rate (tc units)"))
    rates: str | None = field(default=None, metadata=_help(
        "--lab: one rate per host, e.g. 1gbit,1gbit,250mbit"))
    procs_per_host: int | None = field(default=None, metadata=_help(
        "--lab: ranks per host (default: --nproc-per-node)"))

    def __post_init__(self) -> None:
        _at_least(self.hosts, 1, "lab")
        _at_least(self.procs_per_host, 1, "procs-per-host")
        if self.hosts is None and (self.rates is not None or self.procs_per_host is not None):
            raise ValueError("--rates and --procs-per-host need --lab N")
        check_rates(self.hosts, self.rates)


@dataclass
class RunConfig:
    """Where and how many: torchrun's flags."""

    nproc_per_node: int = field(default=1, metadata=_help("worker processes on this node"))
    nnodes: int = field(default=1, metadata=_help(
        "nodes in the job; each runs `gradsync run` (or torchrun) with its --node-rank"))
    node_rank: int = field(default=0, metadata=_help("this node's rank, 0 .. nnodes-1"))
    master_addr: str = field(default="127.0.0.1", metadata=_help(
        "address of node 0, where rank 0's rendezvous store listens"))
    master_port: int | None = field(default=None, metadata=_help(
        "port of the rendezvous store (default: a free one on one node, 29500 on several)"))
    max_restarts: int = field(default=0, metadata=_help(
        "restarts after a failure: of the whole group (as torchrun), or with --elastic of "
        "the lost worker alone"))
    log_dir: str | None = field(default=None, metadata=_help(
        "write each rank's output to DIR/rank-N/stdout.log and stderr.log"))
    redirects: Literal[0, 1, 2, 3] = field(default=0, metadata=_help(
        "--log-dir: streams kept off the console (1 stdout, 2 stderr, 3 both)"))
    tee: Literal[0, 1, 2, 3] = field(default=3, metadata=_help(
        "--log-dir: streams also shown on the console, prefixed [rank N] (1 stdout, 2 "
        "stderr, 3 both; --redirects wins)"))
    timeout: float | None = field(default=None, metadata=_help(
        "stop every rank after this many seconds (exit 124)"))
    timeline: str | None = field(default=None, metadata=_help(
        "the script's collectives (Horovod facade, DataParallel) as a Chrome-trace timeline "
        "in this JSON file, every rank's merged at the end (GRADSYNC_TIMELINE)"))
    elastic: ElasticRunConfig = field(default_factory=ElasticRunConfig)
    lab: RunLabConfig = field(default_factory=RunLabConfig)
    horovod: HorovodRunConfig = field(default_factory=HorovodRunConfig)

    def __post_init__(self) -> None:
        _at_least(self.nproc_per_node, 1, "nproc-per-node")
        _at_least(self.nnodes, 1, "nnodes")
        _at_least(self.max_restarts, 0, "max-restarts")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0 .. {self.nnodes - 1} for --nnodes "
                             f"{self.nnodes}, got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port <= PORT_MAX:
            raise ValueError(f"--master-port must be between 1 and {PORT_MAX}, "
                             f"got {self.master_port}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got "
                             f"{self.timeout}")
        if self.log_dir is None and self.redirects:
            raise ValueError("--redirects needs --log-dir (where the output goes)")
        self._check_modes()

    def _check_modes(self) -> None:
        """What the three ways of running (nodes, a lab, elastic) cannot combine."""
        if self.lab.hosts is not None and self.nnodes > 1:
            raise ValueError("--lab N runs every host here; it does not take --nnodes")
        if not self.elastic.elastic:
            return
        if self.nnodes > 1 or self.lab.hosts is not None:
            raise ValueError("--elastic takes no --nnodes or --lab: across hosts, start "
                             "`gradsync rdzv --nnodes MIN:MAX` and, on each host, "
                             "`gradsync run --elastic --rdzv-endpoint HOST:PORT`")
        if self.log_dir is not None:
            raise ValueError("--elastic does not write --log-dir yet: its workers print to "
                             "the console")
        if self.timeline is not None:
            raise ValueError("--timeline is not built for --elastic yet (each generation "
                             "would need its clocks aligned again)")
        if (self.elastic.min_workers or 1) > self.nproc_per_node:
            raise ValueError(f"--min-workers {self.elastic.min_workers} is more than "
                             f"--nproc-per-node {self.nproc_per_node}")

    @property
    def world_size(self) -> int:
        if self.lab.hosts is not None:
            return self.lab.hosts * self.procs_per_host
        return self.nnodes * self.nproc_per_node

    @property
    def procs_per_host(self) -> int:
        """Ranks on each node (or lab host)."""
        return self.lab.procs_per_host or self.nproc_per_node
