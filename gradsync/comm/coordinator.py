"""The launcher's side of an elastic job: the store it hosts and the coordinator that decides
every generation (comm/elastic.py describes the keys and the workers' side).

    coordinator = Coordinator.on_this_host(workers=4, min_workers=2, timeout_s=300.0)
    env = coordinator.env()    # GRADSYNC_ELASTIC_STORE, for the workers' environment
    ...                        # lost(), started(), finished(), poll(): gradsync/launcher/elastic.py
    coordinator.close()

Only the coordinator writes the membership; it also watches the workers' heartbeats
(comm/heartbeat.py) and names the members silent for too long.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .. import env
from .elastic import DONE, STATE, STOP, STORE_ENV, stop_text
from .engine import TORCH, Engine
from .heartbeat import Watch


def host_store(timeout_s: float, engine: Engine = TORCH):
    """Create the job's store in a fresh private directory (mode 0700, so that no other user
    can open the file in it, nor learn what it holds); returns (store, path of its file).

    The path travels to the workers in their environment (``/proc/PID/environ`` is readable
    by the same user only), never on a command line (``/proc/PID/cmdline`` is readable by
    everyone)."""
    folder = tempfile.mkdtemp(prefix="gradsync-elastic-")
    path = os.path.join(folder, "store")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return engine.open_store(path, timeout_s), path
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


class Coordinator:
    """Decides every generation of an elastic job, from the losses, joins and ends it is told
    of and the heartbeats it reads.

    Args:
        store: the job's store (this process writes the membership into it).
        members: the first generation's member ids.
        min_workers: fewer live members than this stops the run.
        lost_s: a member silent this long is lost (default GRADSYNC_ELASTIC_LOST_S, else 3 s).
        startup_s: the longest silence allowed from a member's start to its first heartbeat.
        path: the store's file, when the store is one (:meth:`on_this_host`; None for a
            TCPStore served by the rendezvous service, comm/rendezvous.py).

    On one host the launcher holds it (:meth:`on_this_host`); across hosts the rendezvous
    service does. The workers find the store through :meth:`env`; :meth:`close` removes it.
    """

    def __init__(self, store, members: list[int], min_workers: int, *,
                 lost_s: float | None = None, startup_s: float = 300.0,
                 path: str | None = None):
        self.store, self.path = store, path
        lost_s = env.elastic_lost_s() if lost_s is None else lost_s
        self.watch = Watch(self.store, lost_s, startup_s=startup_s)
        self.min_workers = min_workers
        self.gen, self.members = 0, list(members)
        self._next_uid = max(self.members, default=-1) + 1
        self.pending: set[int] = set()  # replacements started, not yet ready
        self.stopped, self._reason = False, ""
        self._publish()
        for uid in self.members:
            self.watch.start(uid)

    @classmethod
    def on_this_host(cls, workers: int, min_workers: int, timeout_s: float,
                     engine: Engine = TORCH, lost_s: float | None = None) -> "Coordinator":
        """The coordinator of one launcher's workers 0..workers-1, with its store in a
        private file (:func:`host_store`)."""
        store, path = host_store(timeout_s, engine)
        return cls(store, list(range(workers)), min_workers, lost_s=lost_s,
                   startup_s=timeout_s, path=path)

    def env(self) -> dict[str, str]:
        """What a worker's environment needs to reach the store (besides its uid)."""
        assert self.path is not None, "a served store's address is the service's"
        return {STORE_ENV: self.path}

    def close(self) -> None:
        """Remove the store's directory (after the last worker has ended)."""
        if self.path is not None:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def new_uid(self) -> int:
        """The member id of the next replacement this launcher starts."""
        self._next_uid += 1
        return self._next_uid - 1

    @property
    def stop_reason(self) -> str:
        """Why the run stops, for the launcher's last line ("" when no stop was asked for):
        too few workers, or a stop this coordinator did not write (another process of the
        same user, the only ones that can open the store)."""
        if self._reason or not self.store.check([STOP]):
            return self._reason
        return (f"{STOP} was set in the store by another process, not by this launcher "
                f"({self.store.get(STOP).decode(errors='replace')!r})")

    def _publish(self) -> None:
        self.store.set(STATE, " ".join(str(x) for x in [self.gen, *self.members]))

    def lost(self, uid: int) -> bool:
        """Member (or pending replacement) ``uid`` has exited. Returns False when the run
        cannot go on (fewer than ``min_workers`` left): the workers are told to stop."""
        self.watch.forget(uid)
        if uid in self.pending:
            self.pending.discard(uid)
            return True
        if uid not in self.members:
            return True
        self.members.remove(uid)
        if len(self.members) < self.min_workers:
            self.stopped = True
            value = f"{len(self.members)} {self.min_workers}"
            self._reason = stop_text(value.encode())
            self.store.set(STOP, value)
            return False
        self.gen += 1
        self._publish()
        return True

    def finished(self, uid: int) -> None:
        """Member ``uid`` completed the run: admit nobody any more, and tell a replacement
        still waiting to join that there is nothing left to join."""
        self.watch.forget(uid)
        self.stopped = True
        self.store.set(DONE, "1")

    def started(self, uid: int) -> None:
        """A replacement ``uid`` was started; it joins once it says it is ready."""
        self.pending.add(uid)
        self.watch.start(uid)

    def poll(self) -> dict[int, float]:
        """Admit the replacements that are ready (one new generation for all of them).

        Returns:
            the members (and replacements) silent for too long, each with its silence in
            seconds: the launcher kills them, and their exit is a loss like any other.
        """
        ready = sorted(u for u in self.pending if self.store.check([f"elastic/ready/{u}"]))
        if ready and not self.stopped:
            for uid in ready:
                self.pending.discard(uid)
                self.store.delete_key(f"elastic/ready/{uid}")
            self.members += ready
            self.gen += 1
            self._publish()
        return self.watch.check()

    def num_keys(self) -> int:
        return self.store.num_keys()
