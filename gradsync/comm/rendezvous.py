"""The rendezvous service of an elastic job across hosts: the store every host's agent and
worker reaches, and the coordinator that decides every generation.

    gradsync rdzv --endpoint 10.0.0.1:29400 --nnodes 2:4      # one host, outside the workers'
    gradsync run --elastic --rdzv-endpoint 10.0.0.1:29400 --nproc-per-node 2 train.py  # each host

It is a torch.distributed TCPStore (served on the given address only) plus the
:class:`~gradsync.comm.coordinator.Coordinator` of one launcher's job, fed by the hosts'
agents (comm/agent.py) through the store instead of by function calls. Its host is the job's
one single point of failure, as torchrun's c10d rendezvous backend's is: run it on a machine
that does not train. Keys, beside the coordinator's (comm/elastic.py); integers only::

    rdzv/nodes           counter: an agent's ``add`` returns its node id + 1
    rdzv/node/ID         "NPROC"                 the agent of node ID runs NPROC workers
    rdzv/assign/ID       "FIRST COUNT WORLD"     its member ids FIRST.. (COUNT 0: refused)
    elastic/uids         counter: member ids, for the first workers and every replacement
    elastic/event/ID/N   "KIND UID"              node ID's Nth event (N = 0, 1, ...): its
                                                 worker UID exited with a failure (0),
                                                 finished (1), or was started (2, a
                                                 replacement); one key, written at once
    elastic/kill/UID     "MS"                    declared lost after MS ms of silence
    rdzv/hb/ID           "T STEP"                node ID's agent's heartbeat (heartbeat.py)
    rdzv/left/ID         "1"                     the agent of node ID has ended

The first generation forms once ``max_nodes`` agents have registered, or ``min_nodes`` have
and no other came for ``last_call_s``; an agent that registers later is a joining host (its
workers are replacements) while fewer than ``max_nodes`` hosts have live workers.
A member whose heartbeat stops (its host died, its link went down, it hangs) is lost after
GRADSYNC_ELASTIC_LOST_S: the coordinator publishes the next generation at once (its peers
cut their connections to it, comm/sever.py) and the agent, if it can still hear, kills it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import env
from .coordinator import Coordinator
from .elastic import DONE, STOP
from .engine import TORCH, Engine
from .heartbeat import Watch

log = logging.getLogger(__name__)

POLL_S = 0.02
LOST, FINISHED, STARTED = 0, 1, 2
AGENT_KEY = "rdzv/hb/{}"  # a host's agent's heartbeat (comm/heartbeat.py's format)


@dataclass
class Node:
    """One host's agent, as the service knows it."""

    index: int
    uids: set[int] = field(default_factory=set)  # every member id it was given or started
    left: bool = False
    events: int = 0  # its events read so far
    nproc: int = 0  # its workers, once its agent has said (0: not yet)
    seen: float = 0.0  # when its registration was counted
    assigned: bool = False


class RendezvousService:
    """Serve the store on ``addr:port`` and coordinate the job until every host has ended.

    Args:
        addr, port: where to listen (that address only).
        min_nodes, max_nodes: hosts needed to start, and the most that train at once.
        min_workers: fewer live workers than this stops the run.
        timeout_s: the store's timeout; a new worker's allowance until its first heartbeat.
        last_call_s: how long the first generation waits for more than ``min_nodes``.
        lost_s: a worker silent this long is lost (default GRADSYNC_ELASTIC_LOST_S).
    """

    def __init__(self, addr: str, port: int, min_nodes: int, max_nodes: int,
                 min_workers: int = 1, timeout_s: float = 300.0, last_call_s: float = 2.0,
                 lost_s: float | None = None, engine: Engine = TORCH):
        self.store = engine.serve_store(addr, port, timeout_s)
        self.min_nodes, self.max_nodes, self.min_workers = min_nodes, max_nodes, min_workers
        self.timeout_s, self.last_call_s = timeout_s, last_call_s
        self.lost_s = env.elastic_lost_s() if lost_s is None else lost_s
        self.nodes: dict[int, Node] = {}
        self.coordinator: Coordinator | None = None
        self.generations: list[dict] = []  # each published generation, for the record
        self.ended: set[int] = set()  # members that finished, exited or were declared lost
        # The agents beat too: a host that dies before its workers have beaten (still
        # starting) is seen through its agent's silence, not after the start-up allowance.
        self.agents = Watch(self.store, self.lost_s, startup_s=self.lost_s, key=AGENT_KEY)

    # -- the first generation -------------------------------------------------------------

    def _registered(self) -> list[Node]:
        """Take in the agents registered since the last call; returns those that have said
        how many workers they run and were not yet given any. An agent that died between
        its ``add`` and its ``set`` is given up after ``lost_s``."""
        now = time.monotonic()
        for index in range(len(self.nodes), self.store.add("rdzv/nodes", 0)):
            self.nodes[index] = Node(index, seen=now)
        for node in self.nodes.values():
            if node.nproc or node.left:
                continue
            if self.store.check([f"rdzv/node/{node.index}"]):
                node.nproc = int(self.store.get(f"rdzv/node/{node.index}"))
                self.agents.start(node.index)
            elif now - node.seen > self.lost_s:
                node.left = True
        return [n for n in self.nodes.values() if n.nproc and not n.assigned and not n.left]

    def _assign(self, node: Node, world: int) -> list[int]:
        first = self.store.add("elastic/uids", node.nproc) - node.nproc
        node.uids.update(range(first, first + node.nproc))
        node.assigned = True
        self.store.set(f"rdzv/assign/{node.index}", f"{first} {node.nproc} {world}")
        return list(range(first, first + node.nproc))

    def start(self) -> None:
        """Wait for the first hosts and publish generation 0 with all their workers."""
        deadline = time.monotonic() + self.timeout_s
        seen, since = 0, time.monotonic()
        while True:
            ready = self._registered()
            count = len(ready)
            if count != seen:
                seen, since = count, time.monotonic()
                log.warning("gradsync rdzv: %d host(s) registered (need %d, at most %d)",
                            count, self.min_nodes, self.max_nodes)
            now = time.monotonic()
            if count >= self.max_nodes or (count >= self.min_nodes
                                           and now - since >= self.last_call_s):
                break
            if now > deadline:
                raise TimeoutError(f"only {count} of --nnodes {self.min_nodes} hosts "
                                   f"registered within {self.timeout_s:g} s")
            time.sleep(POLL_S)
        first = ready[:self.max_nodes]
        world = sum(n.nproc for n in first)
        members = [uid for n in first for uid in self._assign(n, world)]
        self.world = world
        self.coordinator = Coordinator(self.store, members, self.min_workers,
                                       lost_s=self.lost_s, startup_s=self.timeout_s)
        self._record("formed")
        for node in ready[self.max_nodes:]:
            self._join(node)

    # -- running --------------------------------------------------------------------------

    def _record(self, why: str) -> None:
        c = self.coordinator
        assert c is not None
        if self.generations and self.generations[-1]["generation"] == c.gen:
            return
        self.generations.append({"generation": c.gen, "members": list(c.members),
                                 "why": why, "t": time.time()})
        log.warning("gradsync rdzv: generation %d (%s): members %s", c.gen, why, c.members)

    def _live(self) -> set[int]:
        c = self.coordinator
        assert c is not None
        return (set(c.members) | c.pending) - self.ended

    def _live_nodes(self) -> int:
        live = self._live()
        return sum(1 for n in self.nodes.values() if n.uids & live)

    def _join(self, node: Node) -> None:
        """A host registered after the first generation: it joins while there is room."""
        c = self.coordinator
        assert c is not None
        if c.stopped or self._live_nodes() >= self.max_nodes:
            node.assigned = True
            self.store.set(f"rdzv/assign/{node.index}", "0 0 0")
            log.warning("gradsync rdzv: host %d refused (%s)", node.index,
                        "the run has ended" if c.stopped else f"{self.max_nodes} hosts train")
            node.left = True
            return
        for uid in self._assign(node, self.world):
            c.started(uid)
        log.warning("gradsync rdzv: host %d joins with workers %s", node.index,
                    sorted(node.uids))

    def _event(self, kind: int, uid: int, node: int) -> None:
        c = self.coordinator
        assert c is not None
        if kind == STARTED:  # a replacement its agent started on the same host
            self.nodes[node].uids.add(uid)
            c.started(uid)
            return
        if kind == LOST:
            self._lose([uid], f"lost worker {uid}")
        elif kind == FINISHED:
            self.ended.add(uid)
            c.finished(uid)

    def _lose(self, uids: list[int], why: str) -> None:
        """Members ``uids`` are gone: the next generation goes on without them."""
        c = self.coordinator
        assert c is not None
        for uid in uids:
            self.ended.add(uid)
            c.lost(uid)
        self._record(why)

    def _step(self) -> None:
        """One round: new hosts, the agents' events, the heartbeats."""
        c = self.coordinator
        assert c is not None
        for node in self._registered():
            self._join(node)
        for node in list(self.nodes.values()):
            while self.store.check([key := f"elastic/event/{node.index}/{node.events}"]):
                kind, uid = (int(x) for x in self.store.get(key).split())
                node.events += 1
                self._event(kind, uid, node.index)
        for uid, silent in c.poll().items():
            self.store.set(f"elastic/kill/{uid}", str(int(silent * 1000)))
            log.warning("gradsync rdzv: worker %d sent no heartbeat for %.1f s (its host "
                        "is down, cut off, or it hangs); declaring it lost", uid, silent)
            self._lose([uid], f"worker {uid} silent")
        for index, silent in self.agents.check().items():
            gone = sorted(self.nodes[index].uids & self._live())
            log.warning("gradsync rdzv: host %d's agent sent no heartbeat for %.1f s (the "
                        "host is down or cut off); declaring its workers %s lost", index,
                        silent, gone)
            self._lose(gone, f"host {index} silent")
        self._record("joined")  # (c.poll above admits the replacements that are ready)
        for node in self.nodes.values():
            if not node.left and self.store.check([f"rdzv/left/{node.index}"]):
                node.left = True

    def _over(self, idle_since: float | None) -> bool:
        """No worker is left, and every host's agent has ended (or ``lost_s`` has passed:
        a host cut off never says so)."""
        if self._live():
            return False
        waited = time.monotonic() - (idle_since or time.monotonic())
        return all(n.left for n in self.nodes.values()) or waited > self.lost_s

    def serve(self) -> int:
        """Run the job to its end; 0 when it completed, 1 when it stopped (the reason is
        logged)."""
        self.start()
        c = self.coordinator
        assert c is not None
        idle_since = None
        while not self._over(idle_since):
            self._step()
            if idle_since is None and not self._live():
                idle_since = time.monotonic()
            time.sleep(POLL_S)
        if self.store.check([STOP]):
            log.warning("gradsync rdzv: the run stopped: %s", c.stop_reason)
            return 1
        log.warning("gradsync rdzv: the run completed%s",
                    "" if self.store.check([DONE]) else " (no worker finished)")
        return 0 if self.store.check([DONE]) else 1
