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

import torch

from .. import comm

ROLES = ("server", "worker")


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
    role = os.environ.get("GRADSYNC_ROLE")
    if role is None or role == "":
        return None
    if role not in ROLES:
        raise ValueError(f"GRADSYNC_ROLE={role!r}: expected server or worker")
    return role == "server"


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


def link_topology(topology=None, world_size: int | None = None) -> comm.Topology | None:
    """The links of the run: ``topology`` (a Topology, or a file from `gradsync bench
    topology --save`), else the lab's when running in one (GRADSYNC_LAB), else None.
    "probe" and "off" (the all-reduce's settings) count as not given."""
    if isinstance(topology, comm.Topology):
        return topology
    if isinstance(topology, str) and topology not in ("probe", "off", ""):
        return comm.Topology.load(topology)
    from ..lab import current

    lab = current()
    if lab is None:
        return None
    per = lab.procs_per_host
    if world_size is not None and world_size != len(lab.hosts) * per:
        return None
    hosts = tuple(comm.HostLink(f"h{h.index}", tuple(range(i * per, (i + 1) * per)),
                                h.rate / 8) for i, h in enumerate(lab.hosts))
    return comm.Topology(hosts)


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
