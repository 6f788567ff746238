"""The ring pipelined across steps against the step-by-step ring, its oracle (ring.py).

Both compute every element as the same chain of ``combine_`` calls, so on random floats
(where a different order of additions would show in the last bits) their results must be
bitwise equal, for every world size, length, segment size, dtype and op tried here; small
``segment_bytes`` give many segments per chunk, lengths below p give empty chunks. One world
of 4 processes runs every gloo check (a world of n < 4 is its first n ranks, as a group).

A second, process-free test runs the pipelined ring on threads over a stand-in for gloo's
point-to-point semantics (a send leaves once its receive is posted, reading the send buffer
then) and checks what the gloo runs cannot see: tags unique per (pair, step, segment), no
send buffer changed while its send is in flight, no receive landing on one, no deadlock.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gradsync.split import chunk_bounds
from tests.distributed import run_checks, scaled
from tests.helpers import digest, first_ranks

SEGMENT_BYTES = [4, 100, 1 << 20]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["sum", "max", "prod"]


def _lengths(n: int, segment_bytes: int) -> list[int]:
    # 1001 at 4-byte segments (hundreds of segments a chunk, two thirds of this module's
    # time) is left out: 7n + 3 there already cuts each chunk into several segments, 1001
    # at 100 bytes into five or more, and the threads test below runs 100-250 a chunk (tags).
    return [1, max(n - 1, 1), 7 * n + 3] + ([1001] if segment_bytes > 4 else [])


def _input(rank: int, length: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + length)
    t = torch.randn(length, generator=g, dtype=torch.float64)
    if op == "prod":  # near 1, so products of several ranks neither vanish nor overflow
        t = 1 + t / 8
    return t.to(dtype)


def _compare(rank, world, n, members=None):
    """On a world of ``n`` (world ranks 0..n-1), or on the view ``members`` of the world: for
    every case, (pipelined, step-by-step) pairs to be equal: the all-reduce's digests, the
    reduce-scatter's bounds and its piece's digests, the pieces form's digests."""
    from gradsync import comm
    from gradsync.comm.algorithms import ring
    from gradsync.comm.ops import ReduceOp
    from gradsync.comm.p2p import P2P

    if members is not None:
        if rank not in members:
            return {}
        p2p = P2P(comm.world(), "test").view(members)
    else:
        group = first_ranks(n)
        if group is None:
            return None
        p2p = P2P(group, "test")
    p, r = p2p.size, p2p.rank
    out = {}
    for seg in SEGMENT_BYTES:
        for dtype in DTYPES:
            for length in _lengths(p, seg):
                for op in OPS:
                    x, op_ = _input(r, length, dtype, op), ReduceOp(op)
                    a, b = x.clone(), x.clone()
                    ring.ring_all_reduce(a, op_, p2p, segment_bytes=seg)
                    ring.ring_all_reduce_stepwise(b, op_, p2p, segment_bytes=seg)
                    c, d = x.clone(), x.clone()
                    (lo, hi) = ring.ring_reduce_scatter(c, op_, p2p, segment_bytes=seg)
                    (olo, ohi) = ring.ring_reduce_scatter_stepwise(d, op_, p2p, segment_bytes=seg)
                    # The pieces form, (p * length,): its oracle rolls the pieces by one.
                    stage = _input(r, p * length, dtype, op)
                    rolled = stage.view(p, length).roll(1, dims=0).reshape(-1)
                    ra, rb = ring.ring_reduce_scatter_stepwise(rolled, op_, p2p, segment_bytes=seg)
                    piece = ring.ring_reduce_scatter_pieces(stage, op_, p2p, segment_bytes=seg)
                    out[(seg, str(dtype), length, op)] = [
                        (digest(a), digest(b)), ((lo, hi), (olo, ohi)),
                        (digest(c[lo:hi]), digest(d[olo:ohi])),
                        (digest(piece), digest(rolled[ra:rb]))]
    return out


def _check(results):
    what = ["all-reduce", "reduce-scatter bounds", "reduce-scatter piece", "pieces form"]
    checked = 0
    for value in results:
        for key, pairs in value.items():
            for name, (got, oracle) in zip(what, pairs):
                assert got == oracle, f"{name} differs from the step-by-step ring for {key}"
            checked += 1
    assert checked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_pipelined_ring_is_bitwise_the_stepwise_ring(world, world_size):
    results = world[f"ring {world_size}"][:world_size]
    _check(results)
    # Every rank ends with the same all-reduce bits.
    for key in results[0]:
        assert len({r[key][0][0] for r in results}) == 1, f"ranks differ for {key}"


@pytest.mark.timeout(240)
def test_pipelined_ring_on_a_view_of_the_group(world):
    # Ranks 0, 2, 3 of 4 as a ring of 3: peers are positions in the view; rank 1 sits out.
    results = world["view"]
    assert results[1] == {}
    _check(results)


def _closed_form(rank, world, n):
    from gradsync.comm.algorithms.ring import ring_reduce_scatter
    from gradsync.comm.ops import ReduceOp
    from gradsync.comm.p2p import P2P

    group = first_ranks(n)
    if group is None:
        return None
    t = torch.arange(1001, dtype=torch.float64) * (group.rank + 1)
    a, b = ring_reduce_scatter(t, ReduceOp.SUM, P2P(group, "test"), segment_bytes=64)
    return a, b, t[a:b].numpy()


@pytest.mark.timeout(240)
def test_pipelined_reduce_scatter_closed_form(world):
    n = 3
    for a, b, piece in world["closed form 3"][:n]:
        np.testing.assert_array_equal(piece, np.arange(a, b, dtype=np.float64) * n * (n + 1) / 2)


# One world of 4 runs every check above (a start-up for all); a world of n < 4 is world
# ranks 0..n-1.
CHECKS = [*((f"ring {n}", _compare, (n,)) for n in (2, 3, 4)),
          ("view", _compare, (4, [0, 2, 3])),
          ("closed form 3", _closed_form, (3,))]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, 4, timeout=230)


# --- a stand-in for gloo's point-to-point, on threads -------------------------------------

class _Transfer:
    def __init__(self):
        self.done = threading.Event()

    def wait(self):
        if not self.done.wait(scaled(20)):
            raise RuntimeError("deadlock: a transfer never completed")
        return True

    def is_completed(self):
        return self.done.is_set()


class _Wire:
    """Sends and receives matched by (src, dst, tag); a message moves when both are posted,
    reading the send buffer then (as gloo does). Records every rule broken."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sends, self.recvs = {}, {}     # (src, dst, tag) -> (tensor, snapshot, transfer)
        self.used = set()                   # every (src, dst, tag) ever sent
        self.in_flight = {}                 # rank -> list of (tensor, transfer) still sending
        self.errors = []

    def _move(self, key):
        src_t, snapshot, sent = self.sends.pop(key)
        dst_t, _, received = self.recvs.pop(key)
        if not torch.equal(src_t, snapshot):
            self.errors.append(f"{key}: send buffer changed while in flight")
        dst_t.copy_(src_t)
        sent.done.set()
        received.done.set()

    def isend(self, rank, t, dst, tag):
        key = (rank, dst, tag)
        work = _Transfer()
        with self.lock:
            if key in self.used:
                self.errors.append(f"{key}: tag used twice")
            self.used.add(key)
            self.sends[key] = (t, t.clone(), work)
            self.in_flight.setdefault(rank, []).append((t, work))
            if key in self.recvs:
                self._move(key)
        return work

    def irecv(self, rank, t, src, tag):
        key = (src, rank, tag)
        work = _Transfer()
        with self.lock:
            for s, w in self.in_flight.get(rank, []):
                if not w.is_completed() and _overlaps(s, t):
                    self.errors.append(f"{key}: receive posted onto a send in flight")
            self.recvs[key] = (t, None, work)
            if key in self.sends:
                self._move(key)
        return work


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class _FakeP2P:
    def __init__(self, wire, rank, size):
        self.wire, self.rank, self.size = wire, rank, size

    def isend(self, t, peer, tag=0):
        return self.wire.isend(self.rank, t, peer, tag) if t.numel() else _Done()

    def irecv(self, t, peer, tag=0):
        return self.wire.irecv(self.rank, t, peer, tag) if t.numel() else _Done()

    def wait(self, work, peer):
        work.wait()


class _Done:
    def wait(self):
        return True

    def is_completed(self):
        return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("which", ["all_reduce", "reduce_scatter"])
def test_pipelined_ring_keeps_gloo_rules_on_threads(n, which):
    from gradsync.comm.algorithms import ring
    from gradsync.comm.ops import ReduceOp

    for length, seg in [(1003, 8), (n - 1, 4), (64 * n, 1 << 20)]:
        wire = _Wire()
        inputs = [_input(r, length, torch.float32, "sum") for r in range(n)]
        bufs = [x.clone() for x in inputs]
        failures = []

        def run(r):
            try:
                fn = getattr(ring, f"ring_{which}")
                fn(bufs[r], ReduceOp.SUM, _FakeP2P(wire, r, n), segment_bytes=seg)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failures.append(f"rank {r}: {exc!r}")

        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(scaled(60))
        assert not failures and not any(t.is_alive() for t in threads), failures
        assert not wire.errors, wire.errors[:5]
        assert not wire.sends and not wire.recvs, "unmatched transfers left"
        want = torch.stack([x.double() for x in inputs]).sum(0)
        for r in range(n):
            # reduce-scatter: only the piece rank r owns, (r + 1) mod n, is final.
            a, b = (0, length) if which == "all_reduce" else chunk_bounds(length, n)[(r + 1) % n]
            np.testing.assert_allclose(bufs[r][a:b].double().numpy(), want[a:b].numpy(),
                                       rtol=1e-5, atol=1e-5)
