"""The critical path of a step whose buckets go through top-k's or PowerSGD's comm hook.

DataParallel calls a bucket's hook the moment the bucket is full, on the training thread,
inside backward; the handle it returns is waited for after backward, bucket by bucket, in
order (allreduce/data_parallel.py). What each hook does at those two moments:

- top-k (compress/topk.py): at the call, error feedback and the selection (on the training
  thread: backward waits for it), then two all-gathers, values and int64 indices, started
  on the engine; at the wait, the two gathers' end and the scatter-add of every rank's
  values (the decode).
- PowerSGD (compress/powersgd.py, powersgd_step.py): at each call, error feedback and
  P = M Q; the last bucket's call starts one all-reduce of every bucket's uncompressed
  vectors and P; the first wait blocks on it, orthogonalises every P, computes Q = M^T P,
  runs a second all-reduce (every Q) and blocks on it, then M = P Q^T. Two collectives a
  step, whatever the buckets, one after the other.

So a step is::

    backward' = B + sum of the calls' encoding          (the calls run inside backward)
    top-k:    end_i = max(launch_i, end_{i-1}) + bucket i's two gathers
              after backward, per bucket in order: t = max(t, end_i) + decode_i
    PowerSGD: t = max(backward', launch_last + all-reduce(vectors, P)) + decode
                  + all-reduce(Q)
    step      = D + F + t + O

A collective of small messages is latency-bound: each of its messages on the critical path
costs the link's latency and a hop, the algorithm's alpha (at least the lab's per-message
cost when the hosts are namespaces of this machine) stretched by the s ranks that share
each core (shared.py: measured in lab runs from 2 to 6 hosts on 2 cores). The hop is what
a one-rank timing of the hook cannot see (docs/benchmarks.md, section 16).
"""

from __future__ import annotations

from ..comm.cost_model import CostModel, network_time, shape
from .cluster import Cluster
from .profile import Profile
from .shared import fan, handoff_saved_s, load, message_s

HOOKED = ("topk", "powersgd")
# On one host DataParallel's plain shm buckets live in shared memory and are reduced where
# they lie: about 3 S of memory traffic per rank for S bytes (comm/shared_buckets.py). A
# hooked bucket goes through an ordinary shm all-reduce instead, which copies into the
# segment and back out: about 5.5 S for the same S (docs/plan.md).
SHM_HOOK_TRAFFIC = 5.5 / 3


def hooked(compression: str) -> bool:
    """Whether ``compression``'s hook has the two-moment shape modelled here."""
    return compression.split(":")[0] in HOOKED


def hook_step(profile: Profile, cluster: Cluster, algorithm: str, compression: str,
              bucket_bytes: float, cost: CostModel, slow: float) -> tuple[float, float]:
    """(backward with the hook calls in it, the end of the last bucket's wait), seconds
    from the start of backward, for a multi-rank all-reduce with ``compression``'s hook."""
    step = _topk_step if compression.startswith("topk") else _powersgd_step
    return step(profile, cluster, algorithm, compression, bucket_bytes, cost, slow)


def _topk_step(profile, cluster, algorithm, compression, bucket_bytes, cost, slow):
    """Per bucket: the selection inside backward, then two all-gathers (values, indices)
    in a row on the engine; after backward, bucket by bucket, their end and the decode."""
    frac, G = profile.codecs[compression][1], profile.grad_bytes
    codec_s, share = profile.codec(compression, load(cluster))
    ends, sizes, extra, engine = [], [], 0.0, 0.0
    for ready, n in profile.buckets(bucket_bytes):
        extra += codec_s * slow * share * n / G  # backward stops for the call
        engine = max(engine, ready * slow + extra) + collective_s(
            cluster, "gather", frac * n, 2, cost, slow)
        ends.append(engine)
        sizes.append(n)
    backward = profile.backward_s * slow + extra
    t = backward
    for n, end in zip(sizes, ends):
        t = max(t, end) + codec_s * slow * (1 - share) * n / G
    return backward, t


def _powersgd_step(profile, cluster, algorithm, compression, bucket_bytes, cost, slow):
    """Per bucket: error feedback and P = M Q inside backward; at the last bucket one
    all-reduce of every bucket's vectors and P; at the first wait, after it, the
    orthogonalisation and Q = M^T P of every bucket, one all-reduce of every Q, and
    M = P Q^T (compress/powersgd_step.py): two collectives a step, both on the path."""
    frac, G = profile.codecs[compression][1], profile.grad_bytes
    codec_s, share = profile.codec(compression, load(cluster))
    extra, launch = 0.0, 0.0
    for ready, n in profile.buckets(bucket_bytes):
        extra += codec_s * slow * share * n / G  # backward stops for the call
        launch = ready * slow + extra               # the last bucket's call starts the first
    backward = profile.backward_s * slow + extra
    wire, first = frac * G, profile.first_share(compression)
    t = max(backward, launch + collective_s(cluster, algorithm, first * wire, 1, cost, slow))
    t += codec_s * slow * (1 - share)  # decoding: between the two and after the second
    t += collective_s(cluster, algorithm, (1 - first) * wire, 1, cost, slow)
    return backward, t


def collective_s(cluster: Cluster, algorithm: str, wire: float, count: int,
                 cost: CostModel, slow: float) -> float:
    """``count`` collectives in a row, ``wire`` bytes per rank in all (split among them),
    with ``algorithm`` ("gather": the engine's ring all-gather, p - 1 messages, every rank
    receiving the others' bytes): the ranks' own work, the busiest link or the messages'
    hops (shared.message_s), whichever is longest, plus each message's latency."""
    p = cluster.ranks
    latency = cluster.latency_s if cluster.hosts > 1 else 0.0
    if algorithm == "gather":
        alpha, beta = cost.links["native"]
        messages = p - 1
        local = (p - 1) * wire * beta * slow
        net = (p - 1) * wire / min(cluster.rates) if cluster.hosts > 1 else 0.0
    else:
        alpha, beta = cost.links[algorithm]
        messages, moved, reduced = shape(algorithm, wire / count, p)
        messages = critical_messages(cluster, algorithm, messages)
        local = count * (moved * beta + reduced * cost.gamma) * slow
        if algorithm == "shm":
            local *= SHM_HOOK_TRAFFIC  # no resident buckets behind a hook
        net = network_time(cluster.topology, algorithm, int(wire)) if cluster.hosts > 1 else 0.0
    # The hops (CPU, wake-ups) overlap the bytes on the links: while one rank waits for a
    # core, the others' bytes are still crossing theirs (A's bandwidth-bound rings measured
    # at their wire time, A's top-k below its bytes plus its hops; section 16), so the
    # longest of the three, not their sum.
    hops = count * max(0.0, messages * message_s(cluster, alpha, fan(algorithm, p), algorithm)
                       - handoff_saved_s(cluster, algorithm))
    return max(local, net, hops) + count * messages * latency


def critical_messages(cluster: Cluster, algorithm: str, messages: float) -> float:
    """The messages on one all-reduce's critical path: ``hierarchical`` runs a ring across
    the hosts (2 (h - 1)) between a shared-memory reduce and broadcast on each host (one
    step each), where the flat formula counts a ring over every rank."""
    if algorithm == "hierarchical" and cluster.procs_per_host > 1:
        return 2 * (cluster.hosts - 1) + 2
    return messages
