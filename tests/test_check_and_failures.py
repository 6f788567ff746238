"""Check mode turns mismatched collectives into errors with a per-rank table; a peer that is
lost or silent gives an error that names it instead of a hang."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.distributed import run_checks, run_workers, scaled


def _mismatch(rank, n, case):
    from gradsync import comm

    assert comm.world().check  # GRADSYNC_CHECK=1 from the environment
    t = torch.zeros(4)
    try:
        if case == "shape":
            comm.all_reduce(torch.zeros(4 if rank == 0 else 5))
        elif case == "dtype":
            comm.all_reduce(torch.zeros(4, dtype=torch.float32 if rank else torch.float64))
        elif case == "op":
            comm.all_reduce(t, op="sum" if rank == 0 else "max")
        elif case == "order":
            if rank == 0:
                comm.broadcast(t)
            else:
                comm.all_reduce(t)
        elif case == "algorithm":
            comm.all_reduce(t, algorithm="ring" if rank == 0 else "tree")
    except comm.CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


def _check_passes(rank, n):
    from gradsync import comm

    t = torch.full((3,), float(rank))
    comm.all_reduce(t, algorithm="ring")
    comm.broadcast(t, src=1)
    return t.tolist()


MISMATCHES = {"shape": ["float32[4]", "float32[5]"], "dtype": ["float64[4]", "float32[4]"],
              "op": ["op=sum", "op=max"], "order": ["broadcast", "all_reduce"],
              "algorithm": ["algorithm=ring", "algorithm=tree"]}


@pytest.fixture(scope="module")
def checked():
    """One world in check mode for every mismatch: check mode refuses a mismatched call on
    every rank before any data moves, so the world goes on to the next one."""
    checks = [(case, _mismatch, (case,)) for case in MISMATCHES]
    checks.append(("matching", _check_passes, ()))
    return run_checks(checks, 3, env={"GRADSYNC_CHECK": "1"}, timeout=170)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_check_mode_names_ranks_and_differences(checked, case):
    for message in checked[case]:
        assert "rank 0" in message and "rank 1" in message and "rank 2" in message, message
        for needle in MISMATCHES[case]:
            assert needle in message, message


@pytest.mark.timeout(180)
def test_check_mode_lets_matching_calls_through(checked):
    for value in checked["matching"]:
        assert value == [3.0, 3.0, 3.0]


def _lost_peer(rank, n, algorithm, how="exit"):
    import signal
    import sys

    from gradsync import comm

    comm.all_reduce(torch.ones(8), algorithm=algorithm)  # connections are up
    if rank == n - 1:
        if how == "exit":
            os._exit(0)  # vanish without a word, as a crashed process does
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "sys.exit":
            sys.exit(3)
        raise RuntimeError("a bug in rank 2's training step")
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(1 << 16), algorithm=algorithm)
    except comm.CommError as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "no error", "", 0.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("algorithm,how", [
    ("ring", "exit"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("tree", "exit"), ("native", "exit"), ("native", "sigkill"), ("ring", "sys.exit"),
        ("native", "exception")])])
def test_lost_peer_is_noticed_when_its_connection_drops(algorithm, how):
    # The drop must be noticed well before the comm timeout, which would raise
    # CommTimeoutError.
    comm_timeout = 60.0
    results = run_workers(_lost_peer, 3, algorithm, how, comm_timeout=comm_timeout,
                          expect_failure=True)
    for ok, value in results[:2]:
        assert ok, value
        kind, message, elapsed = value
        assert kind in ("PeerLostError", "CommError"), (kind, message)
        assert "rank" in message and elapsed < scaled(comm_timeout) / 2, (message, elapsed)
    if algorithm in ("ring", "native"):
        # ring: rank 0 receives from its left neighbour, the lost rank 2, and names it;
        # native: the engine names an address, the heartbeats name the rank.
        assert "lost rank 2" in results[0][1][1] or "rank 2 stopped responding" in \
            results[0][1][1], results[0][1][1]


def _silent_peer(rank, n):
    from gradsync import comm

    comm.all_reduce(torch.ones(8), algorithm="ring")
    start = time.monotonic()
    if rank == 1:
        # Rank 1 is alive but busy elsewhere and sends nothing, for twice the timeout: rank
        # 0's timeout (the fact checked) must fire first even when rank 1 got here earlier.
        # A receive of its own would then time out first, and gloo closes the connection on
        # a timeout: rank 0 would see a lost peer instead (seen in a clean-clone run).
        time.sleep(2 * comm.world().timeout_s)
        return "no error", 0.0
    try:
        comm.all_reduce(torch.ones(8), algorithm="ring")
    except comm.CommTimeoutError as exc:
        return str(exc), time.monotonic() - start
    return "no error", 0.0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_silent_peer_times_out_with_a_named_error():
    # A short comm timeout is what this test checks; run_workers scales it, so the bounds
    # on the time it took scale too.
    results = run_workers(_silent_peer, 2, comm_timeout=3.0)
    message, elapsed = results[0]
    assert "timed out" in message and "rank 1" in message, message
    assert scaled(2.5) < elapsed < scaled(15), elapsed


def busy(seconds: float) -> None:
    """Compute for ``seconds`` (a stuck rank is busy, not asleep)."""
    end = time.monotonic() + seconds
    a = torch.randn(64, 64)
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


def _hung_peer(rank, n, stuck_s):
    from gradsync import comm

    comm.set_step(3)
    comm.all_reduce(torch.ones(4), algorithm="native")
    if rank == 1:
        busy(stuck_s)  # alive (its heartbeat goes on) but stuck past the others' timeout
    try:
        comm.all_reduce(torch.ones(4), algorithm="native")
    except comm.CommError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hung_peer_is_named_by_the_timeout_error():
    # Rank 1 is stuck for twice the comm timeout (both scaled alike).
    results = run_workers(_hung_peer, 3, scaled(6.0), comm_timeout=3.0,
                          env={"GRADSYNC_HEARTBEAT_S": "0.2"})
    assert "timed out" in results[2], results[2]
    # Rank 0 serves the store, so its diagnosis always completes (rank 2's may find rank 0
    # already gone once it has returned).
    assert "timed out" in results[0], results[0]
    assert "rank 1 has not arrived (step 3, between collectives (last #1))" in results[0], \
        results[0]


def _stalled(rank, n, stuck_s):
    import logging

    from gradsync import comm

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("gradsync.comm.monitor").addHandler(handler)
    comm.set_step(7)
    comm.all_reduce(torch.ones(4), algorithm="native")
    if rank == 1:
        busy(stuck_s)  # rank 1 is stuck in a long computation before it joins
    comm.all_reduce(torch.ones(4), algorithm="native")
    return [r.getMessage() for r in records]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stall_report_names_the_ranks_that_have_not_arrived():
    # Reported after 1 s of a 3 s wait (both scaled alike); the comm timeout is a hang guard.
    env = {"GRADSYNC_STALL_S": str(scaled(1.0)), "GRADSYNC_HEARTBEAT_S": "0.2"}
    logs = run_workers(_stalled, 3, scaled(3.0), env=env)
    assert logs[1] == [] and logs[2] == []  # only rank 0 reports
    assert any("not arrived: rank 1 (step 7, between collectives (last #1))" in m
               for m in logs[0]), logs[0]
