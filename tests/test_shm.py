"""The shared-memory all-reduce (gradsync/comm/algorithms/shm.py): the correctness matrix of
test_collectives, segment reuse and growth, sub-groups, clean-up of /dev/shm, and the errors
for a rank that never calls, a rank that dies and ranks on another host.

Workers return their MASTER_PORT, which names their segments (gradsync-<port>-...), so the
clean-up checks look only at this run's names, not at other runs on the machine.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess

import pytest
import torch

from tests.distributed import run_workers, scaled
from tests.helpers import DTYPES, OPS, expected, lengths, rank_input
from tests.helpers import digest as _digest

BIG = 3 << 20           # bytes: a few MiB, several times MIN_CAPACITY
BIG_DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _leftovers(port: str) -> list[str]:
    return glob.glob(f"/dev/shm/gradsync-{port}-*")


def _matrix(rank, n):
    from gradsync import comm

    failures, digests = [], {}
    for dtype in DTYPES:
        sizes = lengths(n) + ([BIG // dtype.itemsize + 1] if dtype in BIG_DTYPES else [])
        for length in sizes:
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                # Twice: the first call plans, the second takes the compiled path where the
                # plan allows it (algorithms/shm_fast.py); both are held to the closed form.
                for call in range(2):
                    t = torch.from_numpy(rank_input(rank, length, op)).to(dtype)
                    comm.all_reduce(t, op=op, algorithm="shm")
                    want = torch.from_numpy(expected(n, length, op)).to(dtype)
                    if not torch.equal(t, want):
                        failures.append(f"{dtype} len={length} {op} call {call}: got "
                                        f"{t[:5].tolist()} want {want[:5].tolist()}")
                    digests[(str(dtype), length, op, call)] = _digest(t)
    compiled = _compiled_against_python(rank, n)
    return failures, digests, os.environ["MASTER_PORT"], compiled, _without_extension(rank, n)


def _counting(shm_fast):
    """Count the all-reduces through the C extension (a stand-in module that delegates)."""
    class Counting:
        calls = 0

        def all_reduce(self, *args):
            Counting.calls += args[-1] == 0     # not the resumptions after a long wait
            return real.all_reduce(*args)

    real = shm_fast._shmfast
    shm_fast._shmfast = Counting()
    return Counting, real


def _compiled_against_python(rank, n):
    """The compiled path against the Python path on random inputs (any other order of
    operations shows in the bits), at lengths around SMALL_BYTES (64 KiB), above which calls
    keep the Python path's two phases. Returns (mismatches, C calls per (dtype, length),
    bytes_shm per call on either path)."""
    from gradsync import comm
    from gradsync.comm.algorithms import shm_fast
    from gradsync.comm.cost_model import DEFAULT_COST_MODEL

    if shm_fast._shmfast is None:
        return ["the extension gradsync.comm._shmfast is not built"], {}, set()
    stats, gen = comm.world().stats, torch.Generator().manual_seed(rank)
    counting, real = _counting(shm_fast)
    bad, calls, written = [], {}, set()
    try:
        for dtype in (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16,
                      torch.int8, torch.uint8):
            limit = (64 << 10) // dtype.itemsize
            for length in (1, 3, limit - 1, limit, limit + 1):
                before = counting.calls
                comm.world().small_plans.clear()    # _matrix planned some of these shapes
                for op in OPS if dtype.is_floating_point else ("sum", "max", "min", "prod"):
                    x = (torch.randn(length, generator=gen, dtype=torch.float64) * 4).to(dtype) \
                        if dtype.is_floating_point else \
                        torch.randint(0 if dtype == torch.uint8 else -100, 100, (length,),
                                      generator=gen, dtype=dtype)  # sums, products wrap
                    oracle = x.clone()
                    comm.all_reduce(oracle, op=op, algorithm="shm", cost_model=DEFAULT_COST_MODEL)
                    for call in range(2):   # plan, then the compiled path
                        got, start = x.clone(), stats.bytes_shm
                        comm.all_reduce(got, op=op, algorithm="shm")
                        written.add((length * dtype.itemsize, stats.bytes_shm - start))
                        if not torch.equal(got, oracle):
                            bad.append(f"{dtype} len={length} {op} call {call}")
                calls[(str(dtype), length * dtype.itemsize)] = counting.calls - before
    finally:
        shm_fast._shmfast = real
    return bad, calls, written


def _without_extension(rank, n):
    """Without the extension (as where it did not build) calls take the Python path, and its
    import failure is one debug line."""
    import importlib
    import logging
    import sys

    import gradsync.comm
    from gradsync import comm
    from gradsync.comm.algorithms import shm_fast

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    shm_fast.log.addHandler(handler)
    shm_fast.log.setLevel(logging.DEBUG)
    saved = sys.modules.pop("gradsync.comm._shmfast", None)
    sys.modules["gradsync.comm._shmfast"] = None      # the import raises ImportError
    had = gradsync.comm.__dict__.pop("_shmfast", None)
    try:
        importlib.reload(shm_fast)
        comm.world().small_plans.clear()
        out = []
        for _ in range(3):
            t = torch.full((5,), float(rank + 1))
            out.append(comm.all_reduce(t, algorithm="shm").tolist())
        plans = list(comm.world().small_plans.values())
        return shm_fast._shmfast, out, plans, [r.getMessage() for r in records]
    finally:
        shm_fast.log.removeHandler(handler)
        sys.modules["gradsync.comm._shmfast"] = saved
        if had is not None:
            gradsync.comm._shmfast = had
        importlib.reload(shm_fast)
        comm.world().small_plans.clear()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_shm_every_dtype_length_op(world_size):
    results = run_workers(_matrix, world_size, timeout=55)
    for rank, (failures, _, _, _, _) in enumerate(results):
        assert not failures, f"rank {rank}:\n" + "\n".join(failures[:20])
    for key in results[0][1]:
        assert len({r[1][key] for r in results}) == 1, f"results differ across ranks: {key}"
    assert not _leftovers(results[0][2])
    for rank, (_, _, _, (bad, calls, written), fallback) in enumerate(results):
        assert not bad, f"rank {rank}: compiled path differs from the Python path: {bad}"
        for (dtype, nbytes), count in calls.items():
            small = world_size > 1 and nbytes <= 64 << 10
            # One C call per op (the second call of each); none above 64 KiB or alone.
            assert count == ((5 if "float" in dtype else 4) if small else 0), (dtype, nbytes)
        for nbytes, got in written:     # small: the slot; larger: the slot and a piece of out
            assert got == nbytes if world_size > 1 and nbytes <= 64 << 10 else \
                nbytes < got < 2 * nbytes if world_size > 1 else got == 0, (nbytes, got)
        module, out, plans, logged = fallback
        assert module is None and plans == [None] and out == [[sum(range(1, world_size + 1))] * 5] * 3
        assert len(logged) == 1 and "_shmfast is not available" in logged[0], logged


def _many_and_growing(rank, n):
    from gradsync import comm

    group = comm.world()
    bad = []
    for i in range(300):                        # one segment, many sequence numbers
        t = torch.full((5,), float(rank + i))
        comm.all_reduce(t, algorithm="shm")
        if t.tolist() != [float(n * i + n * (n - 1) // 2)] * 5:
            bad.append((i, t.tolist()))
    capacities = []
    for numel in (10, 70_000, 300_000, 1_000_003, 17):     # float64: 8 B .. 8 MB, then small
        t = torch.arange(numel, dtype=torch.float64) + rank
        comm.all_reduce(t, op="max", algorithm="shm")
        if not torch.equal(t, torch.arange(numel, dtype=torch.float64) + n - 1):
            bad.append(("grow", numel))
        capacities.append(group._shm_segments[tuple(range(n))].capacity)
    return bad, capacities, os.environ["MASTER_PORT"]


@pytest.mark.timeout(60)
def test_shm_many_calls_and_growing_sizes():
    results = run_workers(_many_and_growing, 3, timeout=55)
    for bad, capacities, _ in results:
        assert not bad, bad[:5]
        assert capacities == sorted(capacities) and capacities[-1] >= 8_000_024
        assert capacities[-1] == capacities[-2]     # the small call reuses the big segment
    assert not _leftovers(results[0][2])


def _sub_groups(rank, n):
    from gradsync import comm

    odd = comm.new_group([1, 3])
    low = comm.new_group([0, 1, 2])
    out = {}
    for step in range(3):                       # interleave three segments' sequences
        if odd is not None:
            t = torch.tensor([float(rank), 1.0])
            out[("odd", step)] = comm.all_reduce(t, group=odd, algorithm="shm").tolist()
        if low is not None:
            t = torch.tensor([float(rank)] * 3)
            out[("low", step)] = comm.all_reduce(t, op="prod", group=low,
                                                 algorithm="shm").tolist()
        t = torch.tensor([rank + 1], dtype=torch.int32)
        out[("world", step)] = comm.all_reduce(t, algorithm="shm").tolist()
    return out, os.environ["MASTER_PORT"]


@pytest.mark.timeout(60)
def test_shm_sub_groups():
    results = run_workers(_sub_groups, 4, timeout=55)
    for rank, (out, _) in enumerate(results):
        for step in range(3):
            assert out[("world", step)] == [10]
            if rank in (1, 3):
                assert out[("odd", step)] == [4.0, 2.0]
            if rank in (0, 1, 2):
                assert out[("low", step)] == [0.0] * 3
    assert not _leftovers(results[0][1])


def _never_calls(rank, n):
    from gradsync import comm

    t = torch.ones(8)
    comm.all_reduce(t, algorithm="shm")        # the segment exists: the next wait is on flags
    if rank == 1:
        import time

        time.sleep(scaled(4.0))
        return os.environ["MASTER_PORT"]
    comm.all_reduce(t, algorithm="shm")


@pytest.mark.timeout(40)
def test_shm_names_the_rank_that_never_calls():
    results = run_workers(_never_calls, 2, comm_timeout=1.5, timeout=30, expect_failure=True)
    ok, message = results[0]
    assert not ok
    assert "CommTimeoutError" in message
    assert "rank 0: all_reduce(shm)" in message and "timed out waiting for rank 1" in message
    assert results[1][0] and not _leftovers(results[1][1])


def _killed(rank, n):
    from gradsync import comm

    t = torch.ones(8)
    comm.all_reduce(t, algorithm="shm")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    comm.all_reduce(t, algorithm="shm")


def _port(rank, n):
    from gradsync import comm

    comm.all_reduce(torch.ones(3), algorithm="shm")
    return os.environ["MASTER_PORT"]


@pytest.mark.timeout(40)
def test_shm_sigkill_leaves_nothing_and_stale_names_are_removed():
    results = run_workers(_killed, 2, comm_timeout=20, timeout=30, expect_failure=True)
    ok, message = results[0]
    assert not ok and "PeerLostError" in message and "lost rank 1" in message, message
    # A name left by a creator killed before every rank mapped its segment: a dead pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"/dev/shm/gradsync-0-{dead.pid}-00000000dead"
    open(stale, "wb").close()
    try:
        ports = run_workers(_port, 2, timeout=30)
        assert not os.path.exists(stale)
        assert not _leftovers(ports[0])
    finally:
        if os.path.exists(stale):
            os.unlink(stale)


def _two_hosts(rank, n):
    from gradsync import comm

    os.environ["GRADSYNC_HOST"] = "a" if rank < 2 else "b"
    comm.all_reduce(torch.ones(4), algorithm="shm")


@pytest.mark.timeout(40)
def test_shm_refuses_ranks_on_other_hosts():
    results = run_workers(_two_hosts, 4, timeout=30, expect_failure=True)
    for ok, message in results:
        assert not ok and "ValueError" in message
        assert "shm needs every rank on one host; ranks 2, 3 are elsewhere" in message


def _mixed_against_engine(rank, n):
    """broadcast, reduce_scatter and all_gather through shm, interleaved with all_reduce in
    an order where each call's slots were just read by another kind of call, each held to
    the engine's own result for the same inputs. Small integers, so that sums are exact in
    every dtype and the engine's order of additions cannot make a difference."""
    from gradsync import comm

    bad = []
    gen = torch.Generator().manual_seed(7 + rank)
    for i, (dtype, k) in enumerate([(torch.float32, 1), (torch.float64, 5), (torch.int64, 0),
                                    (torch.bfloat16, 33), (torch.float32, 70_001),
                                    (torch.int32, 3)]):
        x = torch.randint(-40, 41, (n * k,), generator=gen).to(dtype)
        pieces = list(x.view(n, k)) if k else [torch.empty(0, dtype=dtype)] * n
        for op in ("sum", "max") if dtype.is_floating_point else ("sum", "min"):
            got, want = torch.empty(k, dtype=dtype), torch.empty(k, dtype=dtype)
            comm.reduce_scatter(got, pieces, op=op, algorithm="shm")
            comm.reduce_scatter(want, pieces, op=op, algorithm="native")
            if not torch.equal(got, want):
                bad.append(("reduce_scatter", str(dtype), k, op))
        got = [torch.empty(k, dtype=dtype) for _ in range(n)]
        want = [torch.empty(k, dtype=dtype) for _ in range(n)]
        comm.all_gather(got, pieces[rank], algorithm="shm")
        comm.all_gather(want, pieces[rank], algorithm="native")
        if not all(torch.equal(g, w) for g, w in zip(got, want)):
            bad.append(("all_gather", str(dtype), k))
        root = i % n
        got, want = x.clone(), x.clone()
        comm.broadcast(got, src=root, algorithm="shm")
        comm.broadcast(want, src=root, algorithm="native")
        if not torch.equal(got, want):
            bad.append(("broadcast", str(dtype), k, root))
        y = x.clone()
        comm.all_reduce(y, algorithm="shm")     # the next call's slots were just read
        comm.all_reduce(x, algorithm="native")
        if not torch.equal(y, x):
            bad.append(("all_reduce", str(dtype), k))
    return bad, os.environ["MASTER_PORT"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shm_broadcast_reduce_scatter_all_gather_match_the_engine(world_size):
    results = run_workers(_mixed_against_engine, world_size, timeout=55)
    for rank, (bad, _) in enumerate(results):
        assert not bad, f"rank {rank}: {bad}"
    assert not _leftovers(results[0][1])


def _shared_buckets(rank, n):
    """SharedBuckets: buffers of several dtypes in one segment, reduced where they lie,
    many times over, each result held to the engine's; DataParallel on one host uses them."""
    import gradsync
    from gradsync import comm

    layout = [(1, torch.float32), (70_001, torch.float64), (0, torch.int64),
              (33, torch.bfloat16), (5, torch.int32)]
    buckets = comm.SharedBuckets(layout, comm.world())
    bad = []
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)
        for b, (numel, dtype) in enumerate(layout):
            op = "max" if (b + step) % 3 == 0 else "sum"
            mine = torch.randint(-40, 41, (numel,), generator=gen).to(dtype)
            buckets.buffer(b).copy_(mine)
            buckets.all_reduce_async(b, op=op).wait()
            comm.all_reduce(mine, op=op, algorithm="native")
            if not torch.equal(buckets.buffer(b), mine):
                bad.append((step, b, op))
    dp = gradsync.DataParallel(torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 3)),
                               bucket_cap_mb=1e-3)
    return bad, dp.bucket_algorithms, dp._shared is not None, os.environ["MASTER_PORT"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_buckets_reduce_in_place_like_the_engine(world_size):
    for bad, algos, shared, port in run_workers(_shared_buckets, world_size, timeout=55):
        assert not bad, bad
        assert (set(algos), len(algos) > 1, shared) == ({"shm"}, True, True)
    assert not _leftovers(port)
