"""Hierarchical all-reduce against NumPy on faked multi-host layouts, and its traffic shape.

All ranks run on one machine over loopback; a worker fakes the hosts by setting its group's
topology. One world of 8 processes runs every check (tests/distributed.py's run_checks): a
world of n ranks is its first n, and each goes through several layouts of its size, so the
file starts its processes once. Inputs are small integers stored in each dtype (as in
test_collectives), so every expectation is exact; random floats check that results are
bitwise identical across ranks when the summation order matters. A counting engine records
the bytes each rank sends to each peer, which checks the scheme's shape: each host link
carries 2(h-1)/h * S (ANCHORS.md), not a flat ring's figure, and the ranks of one (faked)
host, which really share /dev/shm here, exchange nothing over the engine but the folds of
extra ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_checks
from tests.helpers import DTYPES, OPS, expected, first_ranks, rank_input
from tests.helpers import digest as _digest

COUNT_NUMEL = 840 * 16   # divisible by h * L for every layout below: byte counts are exact
BIG_NUMEL = (3 << 20) // 4 + 5   # 3 MiB of float32, not divisible by any p > 1

# world size -> layouts: (name, hosts as lists of group ranks, or None for no topology)
LAYOUTS = {
    2: [("1x2", [[0, 1]]), ("2x1", [[0], [1]])],
    3: [("2+1", [[0, 1], [2]]), ("none", None)],
    4: [("2x2", [[0, 1], [2, 3]]), ("2x2 interleaved", [[0, 2], [1, 3]]),
        ("3+1", [[0, 1, 2], [3]])],
    5: [("3+2 interleaved", [[0, 2, 4], [1, 3]])],
    6: [("3x2", [[0, 1], [2, 3], [4, 5]]), ("2x3", [[0, 1, 2], [3, 4, 5]])],
    8: [("2x4", [[0, 1, 2, 3], [4, 5, 6, 7]]), ("4x2", [[0, 4], [1, 5], [2, 6], [3, 7]])],
}


def _topology(hosts):
    from gradsync.comm.topology import HostLink, Topology

    if hosts is None:
        return None
    return Topology(tuple(HostLink(f"h{i}", tuple(sorted(h))) for i, h in enumerate(hosts)))


class _CountingEngine:
    """The group's engine, with the bytes of every isend added up per destination rank."""

    def __init__(self, inner):
        self.inner, self.sent = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def isend(self, tensor, dst, pg, tag):
        self.sent[dst] = self.sent.get(dst, 0) + tensor.numel() * tensor.element_size()
        return self.inner.isend(tensor, dst, pg, tag)


def _exact_cases(group, hosts, failures, digests, name):
    from gradsync import comm

    rank, n = group.rank, group.size

    small = max(len(h) for h in hosts) - 1 if hosts else 0   # shorter than a host's ranks
    for dtype in DTYPES:
        for length in sorted({0, 1, max(n - 1, 0), small, 7 * n + 3, 1031}):
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                t = torch.from_numpy(rank_input(rank, length, op)).to(dtype)
                comm.all_reduce(t, op=op, group=group, algorithm="hierarchical")
                want = torch.from_numpy(expected(n, length, op)).to(dtype)
                if not torch.equal(t, want):
                    failures.append(f"{name} {dtype} len={length} {op}: got {t[:5].tolist()} "
                                    f"want {want[:5].tolist()}")
                digests[(name, str(dtype), length, op)] = _digest(t)
    # A few MiB: several ring segments per chunk in every phase.
    for dtype, op in ((torch.float32, "sum"), (torch.int64, "max")):
        t = torch.from_numpy(rank_input(rank, BIG_NUMEL, op)).to(dtype)
        comm.all_reduce(t, op=op, group=group, algorithm="hierarchical")
        if not torch.equal(t, torch.from_numpy(expected(n, BIG_NUMEL, op)).to(dtype)):
            failures.append(f"{name} {dtype} len={BIG_NUMEL} {op}")
        digests[(name, str(dtype), BIG_NUMEL, op)] = _digest(t)


def _random_floats(group, name, digests):
    """Where order matters, each rank's bits must still be the same (returned for checking
    against a float64 reference too)."""
    from gradsync import comm

    values = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(5003, generator=torch.Generator().manual_seed(group.rank),
                        dtype=torch.float64).to(dtype)
        comm.all_reduce(t, op="avg", group=group, algorithm="hierarchical")
        digests[(name, str(dtype), "random")] = _digest(t)
        values[(name, str(dtype))] = t.double().numpy()
    return values


def _count(group, algorithm):
    """Bytes this rank sends to each peer in one all-reduce of COUNT_NUMEL float32."""
    from gradsync import comm

    # Once untimed: the shared-memory segments of this size exist before the count starts.
    comm.all_reduce(torch.ones(COUNT_NUMEL), op="sum", group=group, algorithm=algorithm)
    engine, before = _CountingEngine(group.engine), group.stats.bytes_sent
    group.engine = engine
    try:
        comm.all_reduce(torch.ones(COUNT_NUMEL), op="sum", group=group, algorithm=algorithm)
    finally:
        group.engine = engine.inner
    return engine.sent, group.stats.bytes_sent - before


def _layouts_worker(rank, world, n):
    """Every layout of LAYOUTS[n] on world ranks 0..n-1."""
    group = first_ranks(n)
    if group is None:
        return None
    failures, digests, floats, sent = [], {}, {}, {}
    for name, hosts in LAYOUTS[n]:
        group.topology = _topology(hosts)
        _exact_cases(group, hosts, failures, digests, name)
        floats.update(_random_floats(group, name, digests))
        sent[name] = _count(group, "hierarchical")
        if name == "2x2 interleaved":
            sent["ring " + name] = _count(group, "ring")
    group.topology = None
    return failures, digests, floats, sent


def _expected_sent(hosts, n, rank, nbytes):
    """(bytes to ranks on this rank's host, bytes to other hosts) for one all-reduce of
    ``nbytes``; None for the host split where the call is a flat ring without hosts."""
    if hosts is None:
        return None, 2 * (n - 1) * nbytes // n
    if len(hosts) == 1:
        return 0, 0     # shared memory
    if all(len(h) == 1 for h in hosts):
        return 0, 2 * (n - 1) * nbytes // n
    core, h = min(len(x) for x in hosts), len(hosts)
    host = next(sorted(x) for x in hosts if rank in x)
    local = host.index(rank)
    if local >= core:   # an extra rank: its whole tensor to its core rank and back
        return nbytes, 0
    extras = len(host[core + local::core])
    intra = extras * nbytes    # the steps inside a host go through shared memory
    return intra, 2 * (h - 1) * nbytes // (h * core)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_hierarchical_exact_bitwise_and_traffic(world, world_size):
    results = world[f"layouts {world_size}"][:world_size]
    for rank, (failures, *_) in enumerate(results):
        assert not failures, f"rank {rank}:\n" + "\n".join(failures[:20])
    digests = [r[1] for r in results]
    for key in digests[0]:
        assert len({d[key] for d in digests}) == 1, f"results differ across ranks for {key}"

    ref = np.mean([torch.randn(5003, generator=torch.Generator().manual_seed(r),
                               dtype=torch.float64).numpy() for r in range(world_size)], axis=0)
    tol = {"torch.float32": 1e-6, "torch.float16": 4e-3, "torch.bfloat16": 3e-2}
    for key, value in results[0][2].items():
        np.testing.assert_allclose(value, ref, atol=4 * tol[key[1]], rtol=tol[key[1]],
                                   err_msg=str(key))

    nbytes = COUNT_NUMEL * 4
    for name, hosts in LAYOUTS[world_size]:
        host_of = {r: i for i, h in enumerate(hosts or [range(world_size)]) for r in h}
        for rank, result in enumerate(results):
            per_peer, total = result[3][name]
            intra = sum(b for d, b in per_peer.items() if host_of[d] == host_of[rank])
            want_intra, want_cross = _expected_sent(hosts, world_size, rank, nbytes)
            assert total == sum(per_peer.values()), (name, rank)
            if want_intra is None:
                assert total == want_cross, (name, rank, total)
            else:
                assert (intra, total - intra) == (want_intra, want_cross), (name, rank)
        if hosts and len(hosts) > 1 and all(len(h) == len(hosts[0]) for h in hosts):
            # Each host link carries 2(h-1)/h * S whatever the number of ranks per host.
            h = len(hosts)
            for host in hosts:
                out = sum(b for r in host for d, b in results[r][3][name][0].items()
                          if host_of[d] != host_of[r])
                assert out == 2 * (h - 1) * nbytes // h, (name, host, out)

    if world_size == 4:
        # Interleaved hosts: every hop of a flat ring crosses hosts, 3x the hierarchical bytes.
        hosts = dict(LAYOUTS[4])["2x2 interleaved"]
        host_of = {r: i for i, h in enumerate(hosts) for r in h}
        ring_out = sum(b for r in hosts[0] for d, b in results[r][3]["ring 2x2 interleaved"][0]
                       .items() if host_of[d] != host_of[r])
        assert ring_out == 2 * (2 * 3 * nbytes // 4)


def _direct_worker(rank, world):
    """hierarchical_all_reduce called directly on world ranks 0-3: ``inter`` sees one piece
    per local index, and a view of some ranks maps the topology into its own positions."""
    from gradsync.comm.algorithms import hierarchical_all_reduce, ring_all_reduce
    from gradsync.comm.ops import ReduceOp
    from gradsync.comm.p2p import P2P

    group = first_ranks(4)
    if group is None:
        return None
    group.topology = _topology([[0, 2], [1, 3]])
    calls = []

    def inter(piece, op, view):
        calls.append((piece.numel(), view.members))
        ring_all_reduce(piece, op, view)

    t = torch.arange(10, dtype=torch.float64) * (rank + 1)
    hierarchical_all_reduce(t, ReduceOp.SUM, P2P(group, "test"), inter=inter)
    out = {"full": (t.tolist(), calls)}
    if rank > 0:   # a view of ranks 1, 2, 3: hosts {1, 3} and {2}, uneven
        t = torch.arange(10, dtype=torch.float64) * (rank + 1)
        hierarchical_all_reduce(t, ReduceOp.SUM, P2P(group, "test", members=[1, 2, 3]))
        out["view"] = t.tolist()
    group.topology = None
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hierarchical_inter_and_views(world):
    results = world["inter and views"][:4]
    base = np.arange(10, dtype=np.float64)
    for rank, out in enumerate(results):
        values, calls = out["full"]
        assert values == (base * 10).tolist()
        # Local index 0 of both hosts is {0, 1}, local index 1 is {2, 3}; 10 elements in two
        # host pieces of 5.
        assert calls == [(5, (0, 1) if rank in (0, 1) else (2, 3))], (rank, calls)
        if rank > 0:
            assert out["view"] == (base * 9).tolist(), rank


def test_hierarchical_shape_is_the_ring_without_a_layout():
    from gradsync.comm.algorithms.hierarchical import hierarchical_shape
    from gradsync.comm.algorithms.ring import ring_shape

    for p in (1, 2, 4, 6):
        assert hierarchical_shape(1 << 20, p) == ring_shape(1 << 20, p)


def _unequal_hosts(rank, world):
    """On world ranks 0-5."""
    import torch

    from gradsync import comm
    from gradsync.comm.algorithms.hierarchical import _default_inter
    from gradsync.comm.algorithms.aware import aware_all_reduce
    from gradsync.comm.p2p import P2P
    from gradsync.comm.topology import HostLink, Topology

    group = first_ranks(6)
    if group is None:
        return None
    n = group.size
    group.topology = Topology((HostLink("a", (0, 1), 1e8), HostLink("b", (2, 3), 1e8),
                               HostLink("c", (4, 5), 2.5e7)))
    t = torch.arange(5003, dtype=torch.float64) * (rank + 1)
    comm.all_reduce(t, group=group, algorithm="hierarchical")
    return (_default_inter(P2P(group, "t")) is aware_all_reduce,
            bool(torch.equal(t, torch.arange(5003, dtype=torch.float64) * sum(range(1, n + 1)))))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_unequal_host_links_cross_hosts_with_aware(world):
    assert world["unequal host links"][:6] == [(True, True)] * 6


# One world of 8 runs every check above; a world of n < 8 is world ranks 0..n-1.
CHECKS = [*((f"layouts {n}", _layouts_worker, (n,)) for n in sorted(LAYOUTS)),
          ("inter and views", _direct_worker, ()),
          ("unequal host links", _unequal_hosts, ())]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, 8, timeout=170)
