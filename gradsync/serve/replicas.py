"""Replica processes and their supervision, from the front process's asyncio loop.

Each replica is ``python -m gradsync.serve.replica`` holding one end of a socketpair; frames
(wire.py) cross it, never pickles. A replica whose socket closes (it died: SIGKILL, a crash,
out of memory) is named in the log and replaced in the same slot, after a delay that grows
while that slot's replicas keep dying young (RESTART_BACKOFF_S). The pieces of work it held
are sent once more to another live replica (or to its replacement once ready), so no client
sees an error while a replica lives; a piece is sent again at most once. A replica that does
not answer within ``job_timeout_s`` is killed and treated the same way: a hung replica is a
dead one, never a hang.

A poison request (issue 22): a replica that exits by itself (a crash, not SIGKILL) while
computing a piece was most likely killed by that piece, which is then not sent to another
replica (it would kill that one too) but answered as failed (ReplicaCrashed, HTTP 500 naming
the exit status). The pieces queued behind it are sent again as usual.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import wire
from .metrics import ServeMetrics
from ..checkpoint.format import step_dirname
from .model import ServeError
from .sources import ModelSource

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # importing torch and building a workload on a loaded machine
# Delays before a slot's second, third, ... replacement in a row (the first is immediate);
# a replica that lived STABLE_S resets its slot's count.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0


class ReplicaLost(Exception):
    """The replica holding a piece of work died (or was killed for not answering)."""


class ReplicaJobError(Exception):
    """The replica answered the piece of work with an error (the model failed on it)."""


class ReplicaCrashed(ReplicaJobError):
    """The replica exited by itself while computing the piece: the piece is taken to have
    killed it, and is not sent to another replica."""


@dataclass
class Replica:
    slot: int
    proc: subprocess.Popen
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    outstanding_rows: int = 0
    alive: bool = True
    started: float = 0.0  # the loop's time when it was adopted
    killed: bool = False  # by the front (it did not answer in time): not its pieces' doing

    def __str__(self) -> str:
        return f"replica {self.slot} (pid {self.proc.pid})"


class ReplicaPool:
    """``count`` supervised replicas of the model of ``source``.

    Args:
        source: what every replica loads.
        count: replicas to keep alive.
        threads: torch threads per replica.
        job_timeout_s: longest wait for a piece of work before its replica counts as dead.
        metrics: where per-replica counts go.
    """

    def __init__(self, source: ModelSource, count: int, threads: int,
                 job_timeout_s: float, metrics: ServeMetrics):
        self.source = source
        self.count = count
        self.threads = threads
        self.job_timeout_s = job_timeout_s
        self.metrics = metrics
        self.ready: dict | None = None  # what the first replica said READY with (JSON)
        self._slots: dict[int, Replica] = {}
        self._jobs = itertools.count(1)
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._young_deaths: dict[int, int] = {}  # slot -> replicas in a row that died young

    @property
    def live(self) -> int:
        """Replicas ready to compute now."""
        return sum(r.alive for r in self._slots.values())

    async def start(self) -> None:
        """Start every replica and wait until all are READY.

        Raises:
            ServeError: a replica could not load the model (its message), or exited.
        """
        results = await asyncio.gather(*(self._spawn(slot) for slot in range(self.count)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for replica in results:
                if isinstance(replica, Replica):
                    self._kill(replica)
                    await self._reap(replica)
            raise errors[0]
        for replica in results:
            self._adopt(replica)

    async def _spawn(self, slot: int) -> Replica:
        parent, child = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gradsync.serve.replica", "--fd", str(child.fileno()),
                 "--source", self.source.to_json(), "--threads", str(self.threads)],
                pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        replica = Replica(slot, proc, reader, writer)
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), START_TIMEOUT_S)
        except (asyncio.TimeoutError, wire.WireError):
            frame = None
        except BaseException:  # cancelled (the server is stopping): leave no process behind
            self._kill(replica)
            replica.proc.wait()  # (killed: at once)
            raise
        if frame is None or frame.kind != wire.READY:
            message = frame.payload.decode(errors="replace") if frame is not None else \
                f"exited with status {await self._reap(replica)} before it was ready"
            self._kill(replica)
            raise ServeError(f"{self._model}replica {slot} could not start: {message}")
        ready = json.loads(frame.payload)
        if self.ready is None:
            self.ready = ready
        elif ready != self.ready:
            self._kill(replica)
            raise ServeError(f"{self._model}replica {slot} loaded a model of another "
                             f"shape: {ready}")
        return replica

    @property
    def _model(self) -> str:
        return f"model {self.source.name}: "

    def _adopt(self, replica: Replica) -> None:
        replica.started = asyncio.get_running_loop().time()
        self._slots[replica.slot] = replica
        self._background(self._watch(replica))
        self.metrics.replicas_live.labels(self.source.name).set(self.live)
        self._background(self._notify())

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _watch(self, replica: Replica) -> None:
        """Route the replica's answers to their futures until its socket closes."""
        try:
            while (frame := await wire.read_frame(replica.reader)) is not None:
                future = replica.pending.pop(frame.job, None)
                if future is None or future.done():
                    continue
                if frame.kind == wire.RESULT:
                    future.set_result(frame.array())
                else:
                    future.set_exception(ReplicaJobError(
                        f"{replica}: {frame.payload.decode(errors='replace')}"))
        except (wire.WireError, ConnectionError) as exc:
            log.warning("%s: %s", replica, exc)
        await self._lost(replica)

    async def _lost(self, replica: Replica) -> None:
        if not replica.alive:
            return
        replica.alive = False
        self.metrics.replicas_live.labels(self.source.name).set(self.live)
        self._kill(replica)
        status = await self._reap(replica)
        # The oldest piece still pending is the one it was computing (it answers in order).
        crashed = status is not None and status != -signal.SIGKILL and not replica.killed
        for i, future in enumerate(replica.pending.values()):
            if future.done():
                continue
            if i == 0 and crashed:
                future.set_exception(ReplicaCrashed(
                    f"{replica} exited with status {status} while computing these rows; "
                    "not sent to another replica, which they would likely kill too"))
            else:
                future.set_exception(ReplicaLost(f"{replica} died (exit status {status})"))
        replica.pending.clear()
        if self._closing:
            return
        self.metrics.replica_restarts.labels(self.source.name, str(replica.slot)).inc()
        await self._replace(replica, status)

    async def _replace(self, replica: Replica, status: int | None) -> None:
        """Start a replica in ``replica``'s slot, after a delay that grows with the replicas
        in a row that died young there (a poison request, a model that no longer loads)."""
        slot = replica.slot
        if asyncio.get_running_loop().time() - replica.started >= STABLE_S:
            self._young_deaths[slot] = 0
        log.warning("%s died (exit status %s)", replica, status)
        source, step = self.source.source, self.source.step
        if source is not None and not (Path(source) / step_dirname(step)).exists():
            log.warning("step %d is no longer in %s (pruned?): replica %d restarts from the "
                        "front's private copy in %s", step, source, slot, self.source.path)
        while not self._closing:
            deaths = self._young_deaths.get(slot, 0)
            self._young_deaths[slot] = deaths + 1
            delay = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1] if deaths else 0
            log.warning("starting a replacement for replica %d%s", slot,
                        f" in {delay:g} s" if delay else "")
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                self._adopt(await self._spawn(slot))
                return
            except ServeError as exc:
                log.error("%s", exc)

    def stop_replacing(self) -> None:
        """Shutdown has begun: a replica that dies from now on is not replaced (its pieces
        still go to the others)."""
        self._closing = True

    def _kill(self, replica: Replica) -> None:
        replica.writer.close()
        if replica.proc.poll() is None:
            replica.proc.kill()

    @staticmethod
    async def _reap(replica: Replica) -> int | None:
        try:
            return await asyncio.to_thread(replica.proc.wait, 10.0)
        except subprocess.TimeoutExpired:
            return None

    async def _pick(self) -> Replica:
        """The live replica with the least work queued; waits (bounded) while none lives."""
        while self.live == 0:
            await self._wait_for_live()
        return min((r for r in self._slots.values() if r.alive),
                   key=lambda r: (r.outstanding_rows, len(r.pending)))

    async def _wait_for_live(self) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.live > 0),
                                       self.job_timeout_s)
            except asyncio.TimeoutError:
                raise ReplicaLost(f"no replica alive for {self.job_timeout_s:g} s") from None

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Outputs ``(n, output row_size)`` for ``rows`` ``(n, row_size)``, from one replica;
        sent again once to another if that replica dies.

        Raises:
            ReplicaLost: both tries lost their replica, or none lived long enough.
            ReplicaJobError: the model failed on these rows (ReplicaCrashed: its replica
                exited while computing them; they are not tried again).
        """
        try:
            return await self._infer_once(await self._pick(), rows)
        except ReplicaLost as exc:
            log.warning("%s; sending its %d rows to another replica", exc, len(rows))
            self.metrics.retries.labels(self.source.name).inc()
            return await self._infer_once(await self._pick(), rows)

    async def _infer_once(self, replica: Replica, rows: np.ndarray) -> np.ndarray:
        job = next(self._jobs)
        future = asyncio.get_running_loop().create_future()
        replica.pending[job] = future
        replica.outstanding_rows += len(rows)
        try:
            replica.writer.write(wire.encode_array(wire.JOB, job, rows))
            await replica.writer.drain()
            result = await asyncio.wait_for(asyncio.shield(future), self.job_timeout_s)
        except asyncio.TimeoutError:
            log.error("%s did not answer within %g s; killing it", replica, self.job_timeout_s)
            replica.killed = True
            self._kill(replica)
            raise ReplicaLost(f"{replica} did not answer within {self.job_timeout_s:g} s") \
                from None
        except ConnectionError as exc:
            raise ReplicaLost(f"{replica}: {exc}") from None
        finally:
            replica.outstanding_rows -= len(rows)
            replica.pending.pop(job, None)
        self.metrics.replica_jobs.labels(self.source.name, str(replica.slot)).inc()
        self.metrics.replica_rows.labels(self.source.name, str(replica.slot)).inc(len(rows))
        return result

    async def close(self) -> None:
        """Stop every replica: close its socket (it exits 0), kill it if it lingers."""
        self._closing = True
        replicas = list(self._slots.values())
        for replica in replicas:
            replica.writer.close()
        for replica in replicas:
            try:
                await asyncio.to_thread(replica.proc.wait, 10.0)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                await asyncio.to_thread(replica.proc.wait)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
