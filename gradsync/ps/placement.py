"""Where the parameter servers run: which ranks serve, and what their links carry.

BytePS (OSDI 2020) puts servers on their own hosts ("dedicated": with k = n of them a push+pull
costs S/B, 2(n-1)/n times less than all-reduce) or beside the workers ("co-located": no gain
over all-reduce). gradsync lets the ranks be chosen explicitly:

- default: ranks 0..K-1 serve. In a lab of one rank per host they are dedicated hosts.
- ``server_ranks="0,2,4"``: those ranks serve (e.g. under torchrun, or a lab of two ranks
  per host, ``--procs-per-host 2``, where ranks 2h and 2h + 1 share host h: co-located).
- ``server_ranks="colocated"``: the first rank of every host (LOCAL_RANK 0) serves, the
  others train beside it.
- ``GRADSYNC_ROLE=server`` or ``worker`` in every rank's environment: that rank's role,
  whatever the rest says (torchrun launches every rank alike; a wrapper script sets the
  role). Set it on every rank or none: a rank without it does not join the exchange.

The last two need the ranks to tell each other their roles: one all-reduce at start-up.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .. import comm, env

ROLES = env.ROLES


def parse_server_ranks(spec: str) -> list[int] | str:
    """``"0,2,4"`` as a sorted list, or ``"colocated"``.

    Raises:
        ValueError: not a list of distinct ranks >= 0, nor "colocated".
    """
    if spec == "colocated":
        return spec
    try:
        ranks = [int(r) for r in spec.split(",")]
    except ValueError:
        raise ValueError(f"--server-ranks {spec!r}: expected ranks like 0,2,4 or "
                         "'colocated'") from None
    if min(ranks) < 0 or len(set(ranks)) != len(ranks):
        raise ValueError(f"--server-ranks {spec!r}: ranks must be distinct and >= 0")
    return sorted(ranks)


def _role_from_env() -> bool | None:
    role = env.role()  # ValueError: neither server nor worker
    return None if role is None else role == "server"


def server_ranks(group: comm.Group, servers: int,
                 spec: str | list[int] | None = None) -> list[int]:
    """The ranks of ``group`` that serve, ascending; server k is the k-th of them.

    Raises:
        ValueError: the ranks do not fit the world, their number is not ``servers``, or no
            worker is left (the message says which).
    """
    spec = parse_server_ranks(spec) if isinstance(spec, str) else spec
    claim = _role_from_env()
    if claim is None and spec is not None and spec != "colocated":
        ranks = list(spec)
    elif claim is None and spec is None:
        ranks = list(range(servers))
    else:  # each rank knows only its own role: tell the others
        if claim is None:  # colocated: the first rank of each host
            claim = os.environ.get("LOCAL_RANK", "0") == "0"
        roles = torch.zeros(group.size, dtype=torch.int64)
        roles[group.rank] = int(claim)
        comm.all_reduce(roles, group=group)
        ranks = [r for r, v in enumerate(roles.tolist()) if v]
    if any(r >= group.size for r in ranks):
        raise ValueError(f"server ranks {ranks} do not fit a world of {group.size}")
    if len(ranks) != servers:
        raise ValueError(f"{len(ranks)} ranks serve ({ranks}) but --servers is {servers}")
    if len(ranks) >= group.size:
        raise ValueError(f"every rank of the {group.size} serves: no worker is left")
    return sorted(ranks)


def local_server_ranks(servers: int, spec: str | None, processes: int) -> frozenset[int]:
    """The ranks that serve in a run of ``processes`` local processes: the first ``servers``
    unless ``spec`` (--server-ranks) lists them; "colocated" on one host is rank 0.

    Raises:
        ValueError: ``spec`` names a rank beyond the run's processes.
    """
    if spec is None:
        return frozenset(range(servers))
    ranks = parse_server_ranks(spec)
    if ranks == "colocated":
        return frozenset({0})
    if max(ranks) >= processes:
        raise ValueError(f"--server-ranks {spec}: this run has {processes} processes (ranks "
                         f"0..{processes - 1}: --workers {processes - servers} + --servers "
                         f"{servers})")
    return frozenset(ranks)


def tolerated_ranks(servers: frozenset[int], processes: int, consistency: str,
                    elastic: bool) -> frozenset[int]:
    """The ranks whose loss the launcher lets the run survive: the workers, when the servers
    drop a lost worker and go on (async and ssp always, sync with ``elastic``). An elastic run
    still stops when its first worker, which evaluates and writes the summary, is lost."""
    from .consistency import MODES

    if not (MODES[consistency].drops or elastic):
        return frozenset()
    workers = frozenset(range(processes)) - servers
    return workers - {min(workers)} if elastic else workers


def link_topology(topology=None, world_size: int | None = None) -> comm.Topology | None:
    """The links of the run, as the caller knows them: ``topology`` (a Topology, or a file
    from `gradsync bench topology --save`; the trainer passes the lab's links when it runs in
    one), checked against ``world_size`` when given; else None. "probe" and "off" (the
    all-reduce's settings) count as not given."""
    if isinstance(topology, str) and topology not in ("probe", "off", ""):
        topology = comm.Topology.load(topology)
    if not isinstance(topology, comm.Topology):
        return None
    return topology.validate(world_size) if world_size is not None else topology


def lab_links(lab, world_size: int) -> comm.Topology | None:
    """The links of ``lab`` (a :class:`gradsync.lab.Lab`, or None) as a Topology, when its
    slots are the ``world_size`` ranks of the run; None otherwise."""
    if lab is None or lab.world_size != world_size:
        return None
    return comm.Topology(tuple(comm.HostLink(*link) for link in lab.links()))


def server_weights(links: comm.Topology | None, servers: list[int]) -> list[float] | None:
    """Each server's share of the parameters: its host's link rate when the links are unequal
    (a server on a slow link then holds less); None (equal shares) otherwise."""
    if links is None or not links.unequal():
        return None
    return [links.hosts[links.host_of(r)].rate or 0.0 for r in servers]


def slowest_rate(links: comm.Topology | None) -> float | None:
    """The slowest link's rate in bytes/s (None: not known)."""
    rates = [h.rate for h in links.hosts] if links is not None else []
    return min(rates) if rates and all(rates) else None


def fan_in(host_of: Callable[[int], int] | None, servers: list[int], workers: list[int]
           ) -> int:
    """The most pushes on their way into one host's link at once: each worker has one push to
    each server on the wire (a server posts one payload's receive per worker), so a host's
    servers times the workers on other hosts (``host_of``: a rank's host); without hosts,
    every worker into one server."""
    if host_of is None:
        return len(workers)
    return max((sum(host_of(s) == h for s in servers) * sum(host_of(w) != h for w in workers)
                for h in {host_of(s) for s in servers}), default=0)
