"""The bandwidth-aware all-reduce and broadcast (gradsync/comm/algorithms/aware.py).

The share arithmetic is checked in closed form against ANCHORS.md's example. The collectives
run at world sizes 1-5 on loopback (one world of 5 processes; a smaller world is its first
ranks) with a topology attached whose rates give some ranks no shard at all (the "very slow
host" case), on small integers stored in each dtype so that the NumPy expectation is exact
(tests/helpers.py's inputs); each worker returns digests so the parent can check the
results are bitwise identical across ranks. Small ``chunk_bytes``
make a tensor of a few hundred elements travel as dozens of pipelined chunks (many more than
the WINDOW of 2 in flight) without a large tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_checks
from tests.helpers import DTYPES, OPS, expected, first_ranks, lengths, rank_input
from tests.helpers import digest as _digest

G = 125e6  # 1 Gbit/s in bytes/s
CHUNKED = 263  # elements of the all-reduce cut into 32-byte chunks (a prime: uneven cuts)

# Per world size: link rates (bytes/s). 3: ranks 1 and 2 own nothing; 4: all unequal, all
# owning; 5: rank 4 is ten times slower and owns nothing (test_weights checks these claims).
RATES = {1: [G], 2: [G, G / 4], 3: [2 * G, G, G], 4: [G, 0.8 * G, G, 0.9 * G],
         5: [G, G, G, G, G / 10]}


def test_weights_and_bounds_in_closed_form():
    from gradsync.comm.algorithms.aware import (MAX_CHUNKS, MIN_CHUNK_BYTES, aware_bound,
                                                aware_broadcast_bound, aware_shape,
                                                aware_weights, chunk_count)

    # ANCHORS.md: three 1 Gbit hosts and one at 250 Mbit -> S/3 each, none for the slow one;
    # the bound is the slow host's own S / B_slow (16 MiB: 537 ms).
    assert aware_weights([G, G, G, G / 4]) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert aware_bound(16 * 2**20, [G, G, G, G / 4]) == pytest.approx(16 * 2**20 / (G / 4))
    for n in range(1, 7):
        assert aware_weights([G] * n) == pytest.approx([1 / n] * n)
        # Equal links: (S + (n-2) S/n) / B = 2(n-1)/n S / B, the ring's bound.
        assert aware_bound(1e6, [G] * n) == pytest.approx(2 * (n - 1) / n * 1e6 / G if n > 1
                                                          else 0.0)
    assert aware_weights([G, 3 * G]) == pytest.approx([0.25, 0.75])
    assert aware_bound(1e6, [G, 3 * G]) == pytest.approx(1e6 / G)
    assert aware_weights(RATES[3]) == pytest.approx([1, 0, 0])
    assert all(w > 0.1 for w in aware_weights(RATES[4]))
    assert aware_weights(RATES[5])[4] == 0
    for rates in RATES.values():
        w = aware_weights(rates)
        assert sum(w) == pytest.approx(1) and min(w) >= 0
        n = len(rates)
        # Every owning rank finishes at the same time, a non-owner no later (n = 2: every
        # rank moves S whatever its share, so the shares only follow the rates).
        times = [(1 + (n - 2) * s) / b for s, b in zip(w, rates)]
        owners = [t for t, s in zip(times, w) if s > 0]
        assert n <= 2 or max(owners) == pytest.approx(min(owners))
        assert max(times) == pytest.approx(aware_bound(1, rates))
        if n > 1:  # each rank sends its whole tensor's worth at least once
            assert aware_bound(1, rates) >= max(1 / b for b in rates) * (1 - 1e-12)
    assert aware_broadcast_bound(8e6, [G, G / 4, G]) == pytest.approx(8e6 / (G / 4))
    assert aware_broadcast_bound(8e6, [G]) == 0.0
    # Two message latencies per chunk; a ring's bytes.
    S = 4 * MIN_CHUNK_BYTES
    assert aware_shape(S, 4) == (8, 1.5 * S, 0.75 * S)
    assert chunk_count(1 << 30) == MAX_CHUNKS and chunk_count(1) == 1
    assert aware_shape(1, 4)[0] == 2 and aware_shape(1e6, 1) == (0, 0.0, 0.0)
    with pytest.raises(ValueError):
        aware_weights([G, 0.0])


def _set_topology(group, rates):
    from gradsync.comm.topology import HostLink, Topology

    group.topology = Topology(tuple(HostLink(f"h{r}", (r,), rate)
                                    for r, rate in enumerate(rates)))


def _input(rank, length, op, dtype):
    return torch.from_numpy(rank_input(rank, length, op)).to(dtype)


def _all_reduce_cases(rank, world, n):
    """On a world of ``n`` (world ranks 0..n-1)."""
    from gradsync import comm
    from gradsync.comm.algorithms.aware import aware_all_reduce
    from gradsync.comm.ops import ReduceOp
    from gradsync.comm.p2p import P2P

    group = first_ranks(n)
    if group is None:
        return None
    rank = group.rank
    _set_topology(group, RATES[n])
    assert P2P(group, "test").rates() == RATES[n]  # so the shares follow RATES
    failures, digests = [], {}

    def check(key, t, want):
        want = torch.from_numpy(want).to(t.dtype)
        if not torch.equal(t, want):
            failures.append(f"{key}: got {t[:5].tolist()} want {want[:5].tolist()}")
        digests[key] = _digest(t)

    for dtype in DTYPES:
        for length in lengths(n):
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                t = _input(rank, length, op, dtype)
                comm.all_reduce(t, op=op, group=group, algorithm="aware")
                check((str(dtype), length, op), t, expected(n, length, op))
        # 263 elements in 32-byte chunks: 17-66 chunks (the last one shorter), all pipelined
        # through WINDOW = 2 slots. (Each chunk costs 2(n-1) messages: 1031 elements, 65-258
        # chunks, made these three quarters of the module's time, for the same code path.)
        for op in ("sum", "max", "prod"):
            t = _input(rank, CHUNKED, op, dtype)
            aware_all_reduce(t, ReduceOp(op), P2P(group, "test"), chunk_bytes=32)
            check((str(dtype), "chunked", op), t, expected(n, CHUNKED, op))
    # A few MiB at the default chunk size, through the public call.
    big = 3 * 2**20 // 4 + 5
    t = _input(rank, big, "sum", torch.float32)
    comm.all_reduce(t, op="sum", group=group, algorithm="aware")
    check("big", t, expected(n, big, "sum"))
    # Non-contiguous: reduced through a contiguous copy, written back.
    t = _input(rank, 2 * (n + 3), "sum", torch.float64).view(2, n + 3).t()
    comm.all_reduce(t, group=group, algorithm="aware")
    check("transposed", t, expected(n, 2 * (n + 3), "sum").reshape(2, n + 3).T)
    return failures, digests


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_all_reduce_every_dtype_length_op_against_numpy(world, world_size):
    results = world[f"all_reduce {world_size}"][:world_size]
    for rank, (failures, _) in enumerate(results):
        assert not failures, f"rank {rank}:\n" + "\n".join(failures[:20])
    for key in results[0][1]:
        assert len({d[key] for _, d in results}) == 1, f"results differ across ranks for {key}"


def _sub_group_and_view(rank, n):
    from gradsync import comm
    from gradsync.comm.algorithms.aware import aware_all_reduce
    from gradsync.comm.ops import ReduceOp
    from gradsync.comm.p2p import P2P

    _set_topology(comm.world(), RATES[n])
    out = {}
    # Sub-group of world ranks 0, 2, 4 with its own topology: its group rank 1 owns nothing.
    members = [0, 2, 4]
    sub = comm.new_group(members)
    if sub is not None:
        _set_topology(sub, [G, G / 10, G])
        t = _input(rank, 101, "sum", torch.int64)
        comm.all_reduce(t, group=sub, algorithm="aware")
        want = sum(rank_input(m, 101, "sum") for m in members)
        out["sub_group"] = (t.numpy().tolist() == want.tolist(), _digest(t))
    # A view in an unsorted order: positions 0, 1, 2 are world ranks 4, 0, 1, whose rates
    # come from the world's topology, so position 0 (the slow rank 4) owns nothing.
    view = [4, 0, 1]
    if rank in view:
        t = _input(rank, 203, "max", torch.float32)
        aware_all_reduce(t, ReduceOp.MAX, P2P(comm.world(), "test").view(view), chunk_bytes=64)
        want = np.max([rank_input(m, 203, "max") for m in view], axis=0)
        out["view"] = (t.numpy().tolist() == want.tolist(), _digest(t))
    comm.barrier()
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sub_group_and_p2p_view(world):
    results = world["sub-group and view"]
    for rank, checks in enumerate(results):
        assert all(ok for ok, _ in checks.values()), f"rank {rank}: {checks}"
    assert sorted(r for r, c in enumerate(results) if "sub_group" in c) == [0, 2, 4]
    assert sorted(r for r, c in enumerate(results) if "view" in c) == [0, 1, 4]
    for key in ("sub_group", "view"):
        assert len({c[key][1] for c in results if key in c}) == 1, key


def _broadcast_cases(rank, world, n):
    """On a world of ``n`` (world ranks 0..n-1)."""
    from gradsync import comm
    from gradsync.comm.algorithms.aware import aware_broadcast
    from gradsync.comm.p2p import P2P

    group = first_ranks(n)
    if group is None:
        return None
    _set_topology(group, RATES[n])
    failures = []
    for root in range(n):
        for dtype in (torch.float16, torch.bfloat16, torch.int64):
            for length in (0, 1, 7 * n + 3, 1031):
                want = _input(root, length, "sum", dtype)
                t = want.clone() if rank == root else torch.full((length,), -99).to(dtype)
                comm.broadcast(t, src=root, group=group, algorithm="aware")
                if not torch.equal(t, want):
                    failures.append(f"root {root} {dtype} len={length}")
            t = want.clone() if rank == root else torch.zeros(1031, dtype=dtype)
            aware_broadcast(t, root, P2P(group, "test"), chunk_bytes=40)
            if not torch.equal(t, want):
                failures.append(f"root {root} {dtype} chunked")
    # A few MiB at the default chunk size, asynchronously; and a non-contiguous tensor.
    want = _input(n - 1, 3 * 2**20 // 8 + 3, "sum", torch.float64)
    t = want.clone() if rank == n - 1 else torch.zeros_like(want)
    if not torch.equal(comm.broadcast_async(t, src=n - 1, group=group, algorithm="aware")
                       .wait(), want):
        failures.append("big async")
    want = _input(0, 3 * (n + 2), "sum", torch.float32).view(3, n + 2).t()
    t = want.clone() if rank == 0 else torch.zeros(3, n + 2).t()
    comm.broadcast(t, src=0, group=group, algorithm="aware")
    if not torch.equal(t, want):
        failures.append("transposed")
    try:
        comm.broadcast(t, group=group, algorithm="tree")
        failures.append("no error for algorithm='tree'")
    except ValueError as exc:
        if "native, aware" not in str(exc):
            failures.append(f"error does not list the choices: {exc}")
    return failures


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_broadcast_from_every_root_against_the_root(world, world_size):
    for rank, failures in enumerate(world[f"broadcast {world_size}"][:world_size]):
        assert not failures, f"rank {rank}:\n" + "\n".join(failures[:20])


def _check_mode(rank, world, mismatch):
    """On world ranks 0-2 in check mode."""
    from gradsync import comm

    group = comm.new_group([0, 1, 2], check=True)
    if group is None:
        return None
    t = torch.full((5,), float(rank))
    try:
        comm.broadcast(t, src=1, group=group,
                       algorithm="native" if mismatch and rank == 0 else "aware")
    except comm.CollectiveMismatchError as exc:
        return str(exc)
    return t.tolist()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_check_mode_passes_aware_broadcast_and_names_a_mismatch(world):
    assert world["check mode"][:3] == [[1.0] * 5] * 3
    for message in world["check mode mismatch"][:3]:
        assert "algorithm=native" in message and "algorithm=aware" in message, message


# One world of 5 runs every check above; a world of n < 5 is world ranks 0..n-1. The
# mismatch comes last: check mode refuses it on every rank alike, but nothing follows it.
CHECKS = [*((f"all_reduce {n}", _all_reduce_cases, (n,)) for n in (1, 2, 3, 4, 5)),
          ("sub-group and view", _sub_group_and_view, ()),
          *((f"broadcast {n}", _broadcast_cases, (n,)) for n in (1, 2, 3, 5)),
          ("check mode", _check_mode, (False,)),
          ("check mode mismatch", _check_mode, (True,))]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, 5, timeout=170)
