"""Ranks that share one machine's cores (the lab: every host is a namespace of this machine;
or more ranks than cores on one host): what a step costs beyond each rank's compute slowed
by s = ranks / cores.

Two terms, both from measurements of lab runs (benchmarks/plan_cpu.py: the ranks' CPU
time and /proc/stat over a window of steps; docs/plan.md says which runs):

- **A message's hop.** A collective's step is a message each rank sends and the next one
  waits for. With a core per rank it costs ``LAB_MESSAGE_S`` between two lab hosts (the
  veth pair, the bridge and tbf on both sides, the receiver's wake-up: gloo's alpha in a
  2-host lab, where loopback's is 0.19 ms). With s ranks per core every stage of that hop
  (the sender's system call, the kernel's forwarding, the receiver's gloo thread and its
  waiting main thread) runs 1 / s of the time, so a hop lasts ``s x LAB_MESSAGE_S``: the
  per-message time inferred from step times grew as 0.4 ms x s from 2 to 6 lab hosts on 2
  cores (s = 1 .. 3), for plain and PowerSGD all-reduces alike. This replaces the
  scheduling hop fitted earlier (``3.0 ms (1 - 1/s)(s - 1)``), which grew as s^2 and
  overpredicted 5 ranks on 2 cores by 68-83 %.
- **The CPU budget.** A step cannot be shorter than all ranks' CPU work per step over the
  cores: each worker's step as profiled plus the training loop around it
  (``LOOP_CPU_S``: metrics, the loss's ``item()``, the sampler), the servers' sums and
  optimizer, and ``ENDPOINT_CPU_S`` of CPU per message at each end (system calls, the
  kernel's forwarding through the lab's bridge, wake-ups: the ranks' system time grows with
  the messages, not with the bytes, at the lab's sizes). It binds where the critical path
  is short and the messages many: the PS with k >= 2 servers on 5 ranks measured 5.07 ms a
  step at 9.6 ms of busy CPU on 2 cores, where its wire and hops predict 2.2 ms.

And one correction to the first: the hop's constants were fitted on gloo's own collectives,
which pay two thread hand-offs a collective that gradsync's do not (``handoff_saved_s``).

The constants named here in capitals are the machine's, not gradsync's: ``cluster.machine``
(machine.py; ENDPOINT_CPU_S is its ``endpoint_cpu_s``, and so on), which `gradsync plan
--lab --calibrate` measures.
"""

from __future__ import annotations

from typing import NamedTuple

from .cluster import Cluster

def message_s(cluster: Cluster, alpha: float, fan: int = 1, algorithm: str = "native"
              ) -> float:
    """One message on a collective's critical path. With a core per rank: its alpha. With s
    ranks per core (s > 1): every rank sends and receives ``fan`` messages at each step of
    the collective (1 in a ring; p - 1 in aware's rounds, which send to every peer at
    once), 2 fan s ENDPOINT_CPU_S of CPU per core, if that is longer than alpha; and the
    receiver finds the cores taken with probability 1 - 1/s (the share of runnable ranks
    off a core), then waits WAKE_S for one."""
    s = cluster.slowdown()
    if s <= 1:
        return alpha
    return max(alpha, 2 * fan * s * cluster.machine.endpoint_s(algorithm)) + wake_s(cluster)


def handoff_saved_s(cluster: Cluster, algorithm: str) -> float:
    """What one collective of ``algorithm`` costs less than the hops say, on shared cores.
    gloo's own collectives ("native", and the engine's all-gather) run on gloo's worker
    thread: the caller hands each one over and waits to be handed it back, two wake-ups a
    collective. gradsync's algorithms run on the caller's thread and make neither. The hop
    constants were fitted on native runs, so they hold those two wake-ups; each finds the
    cores taken, WAKE_S apiece. The sweep's one 5-host pair measured the difference
    (native 10.95, ring 9.45 ms a step, one collective a step: 1.50 ms = 2 WAKE_S)."""
    if cluster.slowdown() <= 1 or algorithm in ("native", "gather"):
        return 0.0
    return 2 * cluster.machine.wake_s


def load(cluster: Cluster) -> float | None:
    """Ranks per core where the ranks fill the cores they share (the load at which a
    compressor's loaded cost is read, Profile.codec); None on a real cluster or with idle
    cores, where the one-rank timing stands."""
    if not cluster.cores or cluster.ranks < cluster.cores:
        return None
    return cluster.ranks / cluster.cores


def wake_s(cluster: Cluster) -> float:
    """A message's expected wait for its receiver to get a core (0 with a core per rank)."""
    s = cluster.slowdown()
    return cluster.machine.wake_s * (1 - 1 / s) if s > 1 else 0.0


class CpuWork(NamedTuple):
    """All ranks' CPU work in one step, as the budget counts it."""

    worker_s: float
    """One worker's profiled step with its codec, unscaled."""
    workers: int
    server_s: float
    """Every server's work together (0 for All-Reduce)."""
    message_ends: float
    algorithm: str
    """Whose messages: "ps", or the all-reduce's algorithm (SharedCores.endpoint_s)."""


def cpu_floor_s(cluster: Cluster, work: CpuWork | None) -> float:
    """The shortest step all ranks' CPU work allows on the shared cores (0 on a real
    cluster, where each rank has its own): (workers x (their step + the loop) + the servers'
    work + message ends x ENDPOINT_CPU_S) / cores."""
    if not cluster.cores or work is None:
        return 0.0
    m = cluster.machine
    endpoint = m.endpoint_s(work.algorithm)
    return (busy_beyond_ends_s(work, m.loop_cpu_s) + work.message_ends * endpoint) / cluster.cores


def busy_beyond_ends_s(work: CpuWork, loop_cpu_s: float) -> float:
    """The budget's CPU other than the message ends: the workers' steps and loops and the
    servers' work (what calibrate.py subtracts from a run's busy CPU)."""
    return work.workers * (work.worker_s + loop_cpu_s) + work.server_s


def collective_ends(messages: float, ranks: int) -> float:
    """Message ends of one collective whose critical path is ``messages`` long, every rank
    sending and receiving one message at each of its steps (ring, gather)."""
    return 2 * messages * ranks


def fan(algorithm: str, ranks: int) -> int:
    """Messages each rank sends (and receives) at one step of ``algorithm``: aware's rounds
    reach every peer at once; the others send to one."""
    return ranks - 1 if algorithm == "aware" else 1
