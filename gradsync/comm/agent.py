"""A host's agent in an elastic job across hosts: it registers with the rendezvous service
(comm/rendezvous.py), learns its workers' member ids, and reports their exits; the
launcher's supervision loop (gradsync/launcher/elastic.py) drives it as its policy.

    agent = Agent.register("10.0.0.1", 29400, nproc=2, timeout_s=300.0)
    run_elastic(cmd, env_of, agent.uids, agent, max_restarts=1)
    agent.close()

The agent talks to the service with a short timeout (GRADSYNC_ELASTIC_LOST_S): an agent
that cannot reach the service for that long has been cut off from the job (its host's
link is down) and the survivors have gone on without its workers; it kills them and stops,
so that no worker of a host that left the job trains on by itself.
"""

from __future__ import annotations

import logging
import time

from .. import env
from .elastic import STOP
from .engine import TORCH, Engine
from .heartbeat import LEAVING, encode
from .rendezvous import AGENT_KEY, FINISHED, LOST, POLL_S, STARTED

log = logging.getLogger(__name__)


class AgentRefused(Exception):
    """The service admits no more hosts (the run has ended, or it trains with the most)."""


class Agent:
    """One host's side of the job (the policy of ``run_elastic``).

    Attributes:
        node: this host's index in the job.
        uids: its first workers' member ids; ``world``: the first generation's worker count
            (WORLD_SIZE of every worker, a joining one's too, as the batch is chosen for it).
    """

    def __init__(self, store, node: int, uids: list[int], world: int, lost_s: float):
        self.store, self.node, self.uids, self.world = store, node, uids, world
        self.lost_s = lost_s
        self.cut_off = False
        self._stop_reason = ""
        self._next_poll = 0.0
        self._events = 0  # events reported (each its own key: rendezvous.py)
        self.beat_s, self._next_beat = env.heartbeat_s(0.5), 0.0

    @classmethod
    def register(cls, host: str, port: int, nproc: int, timeout_s: float,
                 engine: Engine = TORCH) -> "Agent":
        """Register with the service at ``host:port`` and wait for this host's workers.

        Raises:
            AgentRefused: the service admits no more hosts.
            TimeoutError: no answer within ``timeout_s``.
        """
        lost_s = env.elastic_lost_s()
        store = engine.connect_store(host, port, timeout_s)
        node = store.add("rdzv/nodes", 1) - 1
        beat = AGENT_KEY.format(node)
        store.set(beat, encode(_now_ms(), 0))
        store.set(f"rdzv/node/{node}", str(nproc))
        key, deadline = f"rdzv/assign/{node}", time.monotonic() + timeout_s
        while not store.check([key]):
            store.set(beat, encode(_now_ms(), 0))
            if time.monotonic() > deadline:
                raise TimeoutError(f"the rendezvous service at {host}:{port} assigned no "
                                   f"workers to this host within {timeout_s:g} s")
            time.sleep(POLL_S)
        first, count, world = (int(x) for x in store.get(key).split())
        if count == 0:
            store.set(f"rdzv/left/{node}", "1")
            raise AgentRefused("the job admits no more hosts (it has ended, or trains on "
                               "the most --nnodes allows)")
        # From here on a store call that waits longer than lost_s means this host is cut off.
        store.set_timeout(_seconds(lost_s))
        return cls(store, node, list(range(first, first + count)), world, lost_s)

    # -- the policy of run_elastic ---------------------------------------------------------

    def _call(self, fn, *args):
        """A store call; a failure (the service unreachable for lost_s) cuts this host off."""
        if self.cut_off:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a timeout, a reset: the service is gone
            self.cut_off = True
            self._stop_reason = (f"host {self.node} lost the rendezvous service "
                                 f"({str(exc).splitlines()[0][:120]})")
            return None

    def _report(self, kind: int, uid: int) -> None:
        self._call(self.store.set, f"elastic/event/{self.node}/{self._events}", f"{kind} {uid}")
        self._events += 1

    def lost(self, uid: int) -> bool:
        self._report(LOST, uid)
        return not self.cut_off and not self._call(self.store.check, [STOP])

    def finished(self, uid: int) -> None:
        self._report(FINISHED, uid)

    def started(self, uid: int) -> None:
        self.uids.append(uid)
        self._report(STARTED, uid)

    def new_uid(self) -> int:
        n = self._call(self.store.add, "elastic/uids", 1)
        return -1 if n is None else n - 1

    def poll(self) -> dict[int, float]:
        """The workers of this host the service declared lost (uid -> seconds of silence):
        the launcher kills them. Cut off from the service: all of them."""
        now = time.monotonic()
        if now < self._next_poll:
            return {}
        self._next_poll = now + 0.1
        if now >= self._next_beat:  # this host's own heartbeat: its agent is alive
            self._next_beat = now + self.beat_s
            self._call(self.store.set, AGENT_KEY.format(self.node), encode(_now_ms(), 0))
        if self.cut_off:
            return {uid: self.lost_s for uid in self.uids}
        kills = {}
        for uid in self.uids:
            raw = self._call(self.store.get, f"elastic/kill/{uid}") if self._call(
                self.store.check, [f"elastic/kill/{uid}"]) else None
            if raw is not None:
                kills[uid] = int(raw) / 1000
        if self.cut_off:
            return {uid: self.lost_s for uid in self.uids}
        return kills

    @property
    def stop_reason(self) -> str:
        if self._stop_reason:
            return self._stop_reason
        if self._call(self.store.check, [STOP]):
            left, least = self.store.get(STOP).decode().split()
            return f"{left} worker(s) left, fewer than --min-workers {least}"
        return ""

    def close(self) -> None:
        """Say this host's agent has ended (when the service can still hear it)."""
        self._call(self.store.set, AGENT_KEY.format(self.node), encode(LEAVING, 0))
        self._call(self.store.set, f"rdzv/left/{self.node}", "1")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seconds(value: float):
    import datetime

    return datetime.timedelta(seconds=value)
