"""Elastic membership: generations of the world, agreed through a store the launcher hosts.

An elastic job's rendezvous store does not live in a worker: the local launcher holds it
(``Coordinator``, comm/coordinator.py), so it outlives the loss of any worker, rank 0
included. It is a file in a directory only the launcher's user can enter (mode 0700), named
to the workers in their environment (``GRADSYNC_ELASTIC_STORE``): another local user can
neither read the membership nor write a key (the stop among them). A TCPStore would not do:
any local process can connect to it, and its clients can list every key (``list_keys``), so
not even a key prefix derived from a secret would stay secret.

Each worker has a member id (``uid``: 0..N-1 for the first workers, N, N+1, ... for
replacements). The coordinator alone writes the membership, as one key of integers::

    elastic/state  = "G uid uid uid"   generation G and its members, in group-rank order
    elastic/stop   = "left least"      fewer than --min-workers are left: every worker stops
    elastic/done   = "1"               a member finished: a replacement still waiting leaves

and each worker writes its heartbeat (``elastic/hb/UID``, comm/heartbeat.py): the coordinator
declares a member silent for GRADSYNC_ELASTIC_LOST_S (a stopped or hung process) lost, and
the launcher kills it.

It bumps G when the launcher sees a member exit (a loss) and when a replacement it started
says it is ready (``elastic/ready/UID``, a join). A worker forms generation G
(:meth:`ElasticWorld.form`): it closes the old process group (so that peers still blocked on
it see their connections drop), announces itself (``elastic/arrived/G/UID``), waits until
every member of G has, then joins a fresh gloo process group on the prefix ``gG/`` of the
store. The first rank of the new group deletes every key of older generations, so the store
holds the same number of keys after any number of generations.

The store and the groups come from the engine (engine.py: ``open_store``, ``join``); only
torch.distributed has a store, so elastic worlds run on it.

Workers notice a loss through their failed collective; a join at a step boundary, where
the trainer asks :meth:`ElasticWorld.changed` on the group's rank 0 and broadcasts the
answer (gradsync/train/elastic.py). Only integers cross the store.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import time
import weakref

from .. import env
from . import group as group_mod
from . import sever
from .engine import TORCH, Engine
from .errors import CommError, CommTimeoutError
from .group import Group
from .heartbeat import Heartbeat

log = logging.getLogger(__name__)

STATE, STOP, DONE = "elastic/state", "elastic/stop", "elastic/done"
STORE_ENV = "GRADSYNC_ELASTIC_STORE"  # the store's file, in the workers' environment only
POLL_S = 0.005  # store polls while waiting for a generation or its members


class ElasticStopped(CommError):
    """Fewer than the minimum number of workers are left; the launcher has said so."""


class ElasticDone(CommError):
    """The run has finished (a member completed it) before this worker could join."""


class GenerationTimeout(CommTimeoutError):
    """No generation holding this worker formed within the timeout."""


def open_job_store(spec: str, timeout_s: float, engine: Engine = TORCH):
    """A client of the job's store: ``tcp://HOST:PORT`` (the rendezvous service of a job
    across hosts, comm/rendezvous.py) or the path of the launcher's store file."""
    if spec.startswith("tcp://"):
        host, _, port = spec[len("tcp://"):].rpartition(":")
        return engine.connect_store(host.strip("[]"), int(port), timeout_s)
    return engine.open_store(spec, timeout_s)


def stop_text(raw: bytes) -> str:
    """Why the run stopped, from the value of ``elastic/stop`` ("LEFT LEAST")."""
    left, least = _ints(raw)
    return f"{left} worker(s) left, fewer than --min-workers {least}"


def _ints(raw: bytes) -> list[int]:
    return [int(x) for x in raw.decode("ascii").split()]


class ElasticWorld:
    """A worker's side: its member id, the generation it is in, and its group.

    Args:
        store: a client of the coordinator's store.
        uid: this worker's member id.
        timeout_s: the limit for waiting on a generation, and every collective's timeout.
        backend: the engine's backend (default gloo).
        engine: the engine whose store ``store`` is, which joins every generation.
    """

    def __init__(self, store, uid: int, timeout_s: float, backend: str = "gloo",
                 engine: Engine = TORCH):
        self.store, self.uid, self.timeout_s, self.backend = store, uid, timeout_s, backend
        self.engine = engine
        self.step = 0  # steps completed, for the heartbeat (State advances it)
        self.heartbeat: Heartbeat | None = None
        self.gen = -1
        self.members: tuple[int, ...] = ()
        self.group: Group | None = None
        # The sockets that are not a group's (the store's client), and the lock that keeps
        # the heartbeat thread from cutting a group's connections while one is formed.
        self._keep = sever.sockets()
        self._forming = threading.Lock()
        self._severed = -1  # the last generation whose connections were cut

    @classmethod
    def from_env(cls, timeout_s: float, engine: Engine = TORCH) -> "ElasticWorld":
        """Open the store GRADSYNC_ELASTIC_STORE names as member GRADSYNC_ELASTIC_UID and
        start beating (every GRADSYNC_HEARTBEAT_S; stopped at exit)."""
        try:
            path, uid = os.environ[STORE_ENV], int(os.environ["GRADSYNC_ELASTIC_UID"])
        except (KeyError, ValueError):
            raise RuntimeError(f"an elastic worker needs {STORE_ENV} and GRADSYNC_ELASTIC_UID "
                               "(start it with `gradsync train --elastic`)") from None
        world = cls(open_job_store(path, timeout_s, engine), uid, timeout_s, engine=engine)
        world.heartbeat = Heartbeat(world.store, uid, env.heartbeat_s(0.5),
                                    lambda: world.step, after=world.check_lost).start()
        atexit.register(world.heartbeat.stop)
        return world

    def check_lost(self) -> None:
        """(The heartbeat thread, after each beat.) When the coordinator has published a
        generation without a member of this worker's group, or stopped the run, cut the
        group's connections: a collective blocked on a peer that vanished without closing
        them (its host's link down) then fails now, not at the timeout (comm/sever.py)."""
        if self.group is None or self._severed >= self.gen:
            return
        try:
            gen, members = self.latest()
            gone = set(self.members) - set(members) if gen > self.gen else set()
        except ElasticStopped:
            gone = set(self.members)
        if not gone or not self._forming.acquire(blocking=False):
            return  # nobody lost, or the main thread is forming the next group already
        try:
            if self.group is not None and self._severed < self.gen:
                self._severed = self.gen
                cut = sever.sever(self._keep)
                log.info("member %d: members %s of generation %d are gone; cut %d "
                         "connections of its group", self.uid, sorted(gone), self.gen, cut)
        finally:
            self._forming.release()

    # -- what the coordinator says ----------------------------------------------------------

    def latest(self) -> tuple[int, tuple[int, ...]]:
        """The newest generation and its members; raises ElasticStopped after a stop, and
        ElasticDone to a worker outside it once the run has finished."""
        if self.gen < 0 and self.store.check([DONE]):
            raise ElasticDone("the run finished before this worker could join")
        if self.store.check([STOP]):
            raise ElasticStopped(stop_text(self.store.get(STOP)))
        gen, *members = _ints(self.store.get(STATE))
        return gen, tuple(members)

    def changed(self) -> bool:
        """Whether a newer generation than this worker's exists (a store read)."""
        return self.latest()[0] != self.gen

    def announce_ready(self) -> None:
        """A replacement: ask the coordinator for a place in the next generation."""
        self.store.set(f"elastic/ready/{self.uid}", "1")

    # -- forming a generation ---------------------------------------------------------------

    def abandon(self) -> None:
        """Close this worker's process group (after a failed collective, or before a new
        generation), so that peers still blocked in it see their connections drop at once.

        Gloo closes a group's connections only when the last reference to it goes: the
        caller must hold none (the old wrapper, a traceback's frames); the Group object
        itself lets go of it here.
        """
        if self.group is None:
            return
        self.group.shutdown()
        old = weakref.ref(self.group.pg) if self.group.pg is not None else None
        self.group.pg = None
        self.group = None
        try:
            group_mod.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a lost peer
            pass
        # Anything of the failed step caught in a reference cycle is usually young: collecting
        # the young generations costs milliseconds, a full collection with torch loaded 0.2
        # to 0.3 s (measured), which was most of the recovery time. When the group survives
        # that (a cycle of long-lived objects holds it), a peer blocked in one of its
        # collectives would wait for the whole timeout: then collect everything.
        gc.collect(1)
        if old is not None and old() is not None:
            gc.collect()
            log.info("member %d: the abandoned process group needed a full collection",
                     self.uid)
            if old() is not None:
                log.warning("member %d: the abandoned process group is still referenced; a "
                            "peer blocked in it waits for the timeout", self.uid)


    def form(self, newer_than: int | None = None) -> Group:
        """Wait for a generation newer than ``newer_than`` (default: this worker's) that
        holds this worker, and join it.

        Raises:
            ElasticStopped: the coordinator stopped the run.
            GenerationTimeout: no such generation formed within the timeout.
        """
        with self._forming:
            return self._form(self.gen if newer_than is None else newer_than)

    def _form(self, newer_than: int) -> Group:
        deadline = time.monotonic() + self.timeout_s
        self.abandon()
        while True:
            gen, members = self.latest()
            if gen > newer_than and self.uid in members:
                if self._arrive(gen, members, deadline):
                    break
                continue  # a newer generation came while waiting: form that one
            if time.monotonic() > deadline:
                raise GenerationTimeout(f"member {self.uid}: no new generation after "
                                       f"{self.timeout_s:g} s (generation {gen}: members "
                                       f"{list(members)})")
            time.sleep(POLL_S)
        rank = members.index(self.uid)
        arrived = time.monotonic()
        group = group_mod.join_store(self.store, rank, len(members), prefix=f"g{gen}/",
                                     timeout_s=self.timeout_s, backend=self.backend,
                                     engine=self.engine)
        self.gen, self.members, self.group = gen, members, group
        if rank == 0:
            self._forget_before(gen)
        log.debug("member %d: generation %d formed: members arrived after %.3f s, group "
                  "joined after %.3f s more", self.uid, gen,
                  arrived - (deadline - self.timeout_s), time.monotonic() - arrived)
        return group

    def _arrive(self, gen: int, members: tuple[int, ...], deadline: float) -> bool:
        """Announce this worker in ``gen`` and wait for every member; False when a newer
        generation replaced ``gen`` meanwhile."""
        self.store.set(f"elastic/arrived/{gen}/{self.uid}", "1")
        keys = [f"elastic/arrived/{gen}/{m}" for m in members]
        while not self.store.check(keys):
            if self.latest()[0] != gen:
                return False
            if time.monotonic() > deadline:
                missing = [m for m in members if not self.store.check([f"elastic/arrived/{gen}/{m}"])]
                raise GenerationTimeout(f"member {self.uid}: members {missing} never arrived in "
                                       f"generation {gen}")
            time.sleep(POLL_S)
        return True

    def _forget_before(self, gen: int) -> None:
        """Delete every key of generations before ``gen`` (each generation's process group
        and arrivals), so that the store does not grow with the generations."""
        for key in self.store.list_keys():
            name = key if isinstance(key, str) else key.decode()
            head = name.split("/", 1)[0]
            if name.startswith("elastic/arrived/"):
                old = int(name.split("/")[2]) < gen
            else:
                old = head[:1] == "g" and head[1:].isdigit() and int(head[1:]) < gen
            if old:
                self.store.delete_key(name)
