"""Run a test function on several processes joined by gloo on loopback.

Processes come from a forkserver that has imported torch once, so a world of 8 starts in
about a second instead of importing torch eight times. Each worker returns a picklable
result (this is the test harness's own pipe, not data from a network peer); an exception in
any worker fails the test with that worker's traceback, and a worker that does not finish
within ``timeout`` fails it too. Workers are always reaped.

Every timeout in the tests goes through :func:`scaled`: ``GRADSYNC_TEST_TIMEOUT_SCALE=3``
triples them all (run_workers' limits, subprocess timeouts, pytest-timeout's per-test limit
through tests/conftest.py) for a machine much slower or busier than the defaults allow for.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def _timeout_scale() -> float:
    raw = os.environ.get("GRADSYNC_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = -1.0
    if not scale > 0:
        raise ValueError(f"GRADSYNC_TEST_TIMEOUT_SCALE must be a number > 0, got {raw!r}")
    return scale


TIMEOUT_SCALE = _timeout_scale()


def scaled(seconds: float) -> float:
    """``seconds`` times GRADSYNC_TEST_TIMEOUT_SCALE (default 1)."""
    return seconds * TIMEOUT_SCALE


_CTX = mp.get_context("forkserver")
# pytest too: each worker imports the test module its function lives in, which imports
# pytest (0.2 s of CPU per process, more than a small test's own work); torch._dynamo,
# which torch's optimizers import at their first call (2 s of CPU per process).
_CTX.set_forkserver_preload(["torch", "torch._dynamo", "numpy", "gradsync.comm", "pytest"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, comm_timeout, env, args, queue):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from gradsync import comm

    try:
        comm.init_process_group(timeout_s=comm_timeout)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        comm.destroy_process_group()


class WorkerFailed(AssertionError):
    pass


def run_workers(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
                comm_timeout: float = 60.0, env: dict[str, str] | None = None,
                expect_failure: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    ``timeout`` bounds the whole run, ``comm_timeout`` every blocking communication in it;
    both are multiplied by GRADSYNC_TEST_TIMEOUT_SCALE here, so a test that relates another
    duration to them scales that one with :func:`scaled`. The defaults are hang guards with
    room for a busy machine; error-path tests pass short ones.

    Returns the per-rank results; with ``expect_failure`` returns per-rank ``(ok, value)``
    pairs instead of raising, for tests of error paths.
    """
    timeout, comm_timeout = scaled(timeout), scaled(comm_timeout)
    queue = _CTX.Queue()
    port = free_port()
    procs = [_CTX.Process(target=_entry, args=(fn, r, world_size, port, comm_timeout,
                                               env or {}, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = queue.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
                continue
            results[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    missing = sorted(set(range(world_size)) - set(results))
    if expect_failure:
        return [results.get(r, (False, "no result")) for r in range(world_size)]
    if missing:
        raise WorkerFailed(f"ranks {missing} produced no result within {timeout}s "
                           f"(exit codes {[p.exitcode for p in procs]})")
    errors = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    if errors:
        raise WorkerFailed("\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def _run_checks(rank, world_size, checks):
    """Worker of :func:`run_checks`: each check in turn, its result or traceback by name.

    After a failure this rank runs no more checks: its peers may be one collective further
    or behind, so a later check could hang on it or pass by accident. They see it leave
    (a lost peer) in their next collective, which fails their check too, with that error.
    """
    out = {}
    for name, fn, args in checks:
        try:
            out[name] = (True, fn(rank, world_size, *args))
        except BaseException:  # noqa: BLE001 - reported to the parent by name
            out[name] = (False, traceback.format_exc())
            break
    return out


class CheckResults:
    """Per-rank results of :func:`run_checks`, looked up by check name."""

    def __init__(self, names: list[str], per_rank: list[dict[str, tuple[bool, Any]]]):
        self.names, self.per_rank = names, per_rank

    def __getitem__(self, name: str) -> list[Any]:
        """Every rank's result of check ``name``; fails the test with the check's own error
        on any rank, or names the check that failed before it."""
        assert name in self.names, f"no check named {name!r}"
        errors = []
        for rank, results in enumerate(self.per_rank):
            if name not in results:
                failed = [n for n, (ok, _) in results.items() if not ok]
                errors.append(f"--- rank {rank} --- did not run {name!r}: check "
                              f"{failed[0] if failed else '?'!r} failed before it")
            elif not results[name][0]:
                errors.append(f"--- rank {rank} --- check {name!r} failed:\n{results[name][1]}")
        if errors:
            raise WorkerFailed("\n".join(errors))
        return [results[name][1] for results in self.per_rank]


def run_checks(checks: list[tuple[str, Callable[..., Any], tuple]], world_size: int,
               **kwargs: Any) -> CheckResults:
    """Run many checks in one world of ``world_size`` processes: one start-up for all.

    ``checks`` is a list of ``(name, fn, args)``; each rank calls ``fn(rank, world_size,
    *args)`` in list order, so every check must make the same collectives on every rank
    (as a test's worker function does). A check that raises is reported by name when a
    test reads its result (``results[name]``); the checks after it do not run on that rank.
    ``kwargs`` go to :func:`run_workers` (``timeout`` bounds the whole list).
    """
    names = [name for name, _, _ in checks]
    assert len(set(names)) == len(names), f"check names repeat: {names}"
    return CheckResults(names, run_workers(_run_checks, world_size, checks, **kwargs))
