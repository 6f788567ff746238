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
import queue
import threading
import time

from .. import env
from .elastic import STOP, stop_text
from .engine import TORCH, Engine
from .heartbeat import LEAVING, encode
from .rendezvous import AGENT_KEY, FINISHED, LOST, POLL_S, STARTED

log = logging.getLogger(__name__)

REPLACEMENTS = 1_000_000  # the member ids of one host's replacements start at this x (node+1)


class AgentRefused(Exception):
    """The service admits no more hosts (the run has ended, or it trains with the most)."""


class Agent:
    """One host's side of the job (the policy of ``run_elastic``).

    Attributes:
        node: this host's index in the job.
        uids: its first workers' member ids; ``world``: the first generation's worker count
            (WORLD_SIZE of every worker, a joining one's too, as the batch is chosen for it).

    Only one thread of the agent talks to the store (:meth:`_io`): a store call to a service
    that cannot be reached may block for long (a TCPStore client's calls do not all honour
    its timeout), and the launcher's loop must go on supervising meanwhile. The loop hands
    it what to write and reads what it last heard; nothing heard for ``lost_s``: cut off.
    """

    def __init__(self, store, node: int, uids: list[int], world: int, lost_s: float):
        self.store, self.node, self.uids, self.world = store, node, uids, world
        self.lost_s = lost_s
        self.cut_off = False
        self._stop_reason = ""
        self._events = 0  # events reported (each its own key: rendezvous.py)
        self._restarts = 0
        self.beat_s = env.heartbeat_s(0.5)
        self._writes: queue.SimpleQueue = queue.SimpleQueue()  # (key, value) to set
        self._kills: dict[int, float] = {}  # heard: uid -> seconds of silence
        self._stop = b""  # heard: the service's stop ("LEFT LEAST"), empty when none
        self._heard = time.monotonic()  # when the I/O thread last completed a round
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._io, name="gradsync-agent-io",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def register(cls, host: str, port: int, nproc: int, timeout_s: float,
                 engine: Engine = TORCH) -> "Agent":
        """Register with the service at ``host:port`` and wait for this host's workers.

        Raises:
            AgentRefused: the service admits no more hosts.
            TimeoutError: no answer within ``timeout_s``.
        """
        lost_s = env.elastic_lost_s()
        # The client's timeout bounds the calls that honour it; the I/O thread (:meth:`_io`)
        # covers those that do not (seen with a link down).
        store = engine.connect_store(host, port, lost_s)
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
        return cls(store, node, list(range(first, first + count)), world, lost_s)

    # -- the I/O thread -------------------------------------------------------------------

    def _io(self) -> None:
        next_beat = 0.0
        while True:
            try:
                while not self._writes.empty():
                    self.store.set(*self._writes.get())
                if self._closing.is_set():
                    return
                now = time.monotonic()
                if now >= next_beat:  # this host's own heartbeat: its agent is alive
                    next_beat = now + self.beat_s
                    self.store.set(AGENT_KEY.format(self.node), encode(_now_ms(), 0))
                for uid in list(self.uids):
                    if self.store.check([f"elastic/kill/{uid}"]):
                        self._kills[uid] = int(self.store.get(f"elastic/kill/{uid}")) / 1000
                if self.store.check([STOP]):
                    self._stop = self.store.get(STOP)
                self._heard = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a reset, a timeout: the service is gone
                self._cut(f"{str(exc).splitlines()[0][:120]}")
                return
            self._closing.wait(0.1)

    def _cut(self, why: str) -> None:
        if not self.cut_off:
            self.cut_off = True
            self._stop_reason = f"host {self.node} lost the rendezvous service ({why})"

    # -- the policy of run_elastic ---------------------------------------------------------

    def _report(self, kind: int, uid: int) -> None:
        self._writes.put((f"elastic/event/{self.node}/{self._events}", f"{kind} {uid}"))
        self._events += 1

    def lost(self, uid: int) -> bool:
        self._report(LOST, uid)
        return not self.cut_off and not self._stop

    def finished(self, uid: int) -> None:
        self._report(FINISHED, uid)

    def started(self, uid: int) -> None:
        self.uids.append(uid)
        self._report(STARTED, uid)

    def new_uid(self) -> int:
        """A member id for a replacement this agent starts, chosen without asking the service
        (which may be unreachable): REPLACEMENTS * (node + 1) + k for its k-th, above the
        service's own ids (``elastic/uids``) and different on every host."""
        self._restarts += 1
        return REPLACEMENTS * (self.node + 1) + self._restarts - 1

    def poll(self) -> dict[int, float]:
        """The workers of this host the service declared lost (uid -> seconds of silence):
        the launcher kills them. Cut off from the service (nothing heard for lost_s): all."""
        silent = time.monotonic() - self._heard
        if silent > self.lost_s:
            self._cut(f"nothing heard for {silent:.1f} s")
        if self.cut_off:
            return {uid: self.lost_s for uid in self.uids}
        return dict(self._kills)

    @property
    def stop_reason(self) -> str:
        if self._stop_reason:
            return self._stop_reason
        return stop_text(self._stop) if self._stop else ""

    def close(self) -> None:
        """Say this host's agent has ended (when the service can still hear it): the last
        writes go out within ``lost_s`` or not at all."""
        self._writes.put((AGENT_KEY.format(self.node), encode(LEAVING, 0)))
        self._writes.put((f"rdzv/left/{self.node}", "1"))
        self._closing.set()
        self._thread.join(timeout=self.lost_s)


def _now_ms() -> int:
    return int(time.time() * 1000)

