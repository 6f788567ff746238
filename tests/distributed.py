"""Run a test function on several processes joined by gloo on loopback.

Processes come from a forkserver that has imported torch once, so a world of 8 starts in
about a second instead of importing torch eight times. Each worker returns a picklable
result (this is the test harness's own pipe, not data from a network peer); an exception in
any worker fails the test with that worker's traceback, and a worker that does not finish
within ``timeout`` fails it too. Workers are always reaped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "numpy", "gradsync.comm"])


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


def run_workers(fn: Callable[..., Any], world_size: int, *args, timeout: float = 60.0,
                comm_timeout: float = 20.0, env: dict[str, str] | None = None,
                expect_failure: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    Returns the per-rank results; with ``expect_failure`` returns per-rank ``(ok, value)``
    pairs instead of raising, for tests of error paths.
    """
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
