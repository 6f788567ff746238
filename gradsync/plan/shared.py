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
"""

from __future__ import annotations

from .cluster import Cluster

# CPU per message end (a send or a receive, the kernel's forwarding through the lab's bridge
# included): the lab runs' busy CPU beyond the workers' steps and loops, over their message
# ends; medians of the 2, 3, 4 and 6-host runs at 1 Gbit (docs/plan.md), gloo's collectives
# and the PS's own messages separately.
ENDPOINT_CPU_S = 0.14e-3
PS_ENDPOINT_CPU_S = 0.21e-3
# CPU per step of the training loop outside the profiled step, per worker: a one-rank run's
# user time per step (1.19 ms) less its profile's compute (0.41 ms) (docs/plan.md).
LOOP_CPU_S = 0.78e-3
# A woken receiver's wait for a core when every core is taken: fitted to the step times of
# the 2, 3, 4 and 6-host runs (docs/plan.md), not to the settings section 16 scores.
WAKE_S = 0.75e-3


def message_s(cluster: Cluster, alpha: float, fan: int = 1) -> float:
    """One message on a collective's critical path. With a core per rank: its alpha. With s
    ranks per core (s > 1): every rank sends and receives ``fan`` messages at each step of
    the collective (1 in a ring; p - 1 in aware's rounds, which send to every peer at
    once), 2 fan s ENDPOINT_CPU_S of CPU per core, if that is longer than alpha; and the
    receiver finds the cores taken with probability 1 - 1/s (the share of runnable ranks
    off a core), then waits WAKE_S for one."""
    s = cluster.slowdown()
    if s <= 1:
        return alpha
    return max(alpha, 2 * fan * s * ENDPOINT_CPU_S) + wake_s(cluster)


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
    return 2 * WAKE_S


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
    return WAKE_S * (1 - 1 / s) if s > 1 else 0.0


def cpu_floor_s(cluster: Cluster, worker_cpu_s: float, workers: int, server_cpu_s: float,
                message_ends: float) -> float:
    """The shortest step all ranks' CPU work allows on the shared cores (0 on a real
    cluster, where each rank has its own): (workers x (their step + the loop) + the servers'
    work + message ends x ENDPOINT_CPU_S) / cores. ``worker_cpu_s``: one worker's profiled
    step with its codec, unscaled; ``server_cpu_s``: every server's work together."""
    if not cluster.cores:
        return 0.0
    endpoint = PS_ENDPOINT_CPU_S if server_cpu_s else ENDPOINT_CPU_S
    total = workers * (worker_cpu_s + LOOP_CPU_S) + server_cpu_s + message_ends * endpoint
    return total / cluster.cores


def collective_ends(messages: float, ranks: int) -> float:
    """Message ends of one collective whose critical path is ``messages`` long, every rank
    sending and receiving one message at each of its steps (ring, gather)."""
    return 2 * messages * ranks


def fan(algorithm: str, ranks: int) -> int:
    """Messages each rank sends (and receives) at one step of ``algorithm``: aware's rounds
    reach every peer at once; the others send to one."""
    return ranks - 1 if algorithm == "aware" else 1
