"""The critical path of a step whose buckets go through top-k's or PowerSGD's comm hook.

DataParallel calls a bucket's hook the moment the bucket is full, on the training thread,
inside backward; the handle it returns is waited for after backward, bucket by bucket, in
order (allreduce/data_parallel.py). What each hook does at those two moments:

- top-k (compress/topk.py): at the call, error feedback and the selection (on the training
  thread: backward waits for it), then two all-gathers, values and int64 indices, started
  on the engine; at the wait, the two gathers' end and the scatter-add of every rank's
  values (the decode).
- PowerSGD (compress/powersgd.py): at the call, error feedback and P = M Q, then two
  all-reduces started (the uncompressed vectors, P); at the wait, orthogonalising P and
  Q = M^T P, then a third all-reduce (Q) that the wait blocks on, then M = P Q^T. Q's
  all-reduce is queued behind every collective started during backward.

So a step is::

    backward' = B + sum of the calls' encoding          (the calls run inside backward)
    end_i     = max(launch_i, end_{i-1}) + the started collectives of bucket i
    after backward, per bucket in order:  t = max(t, end_i) [+ Q's all-reduce] + decode_i
    step      = D + F + t + O

A collective of small messages is latency-bound: each of its messages on the critical path
costs the algorithm's alpha, the link's latency, and, when more ranks than cores share the
machine, the wait for the receiving rank to be scheduled again (``HOP_S`` times the cores'
oversubscription, ranks / cores - 1: with spare cores a receiver wakes at once). This hop
is what a one-rank timing of the hook cannot see, and what the model before it missed
(docs/benchmarks.md, section 16).
"""

from __future__ import annotations

from ..comm.cost_model import CostModel, network_time, shape
from .cluster import Cluster
from .profile import Profile

# A message's wait for its receiver to get a core back, per unit of oversubscription
# (ranks / cores - 1), fitted to the lab's compressed rows (docs/plan.md).
HOP_S = 2.4e-3
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
    codec_s, frac = profile.codecs.get(compression, (0.0, 1.0))[:2]
    share, G = profile.launch_share(compression), profile.grad_bytes
    topk = compression.startswith("topk")
    started, ends, extra, engine = [], [], 0.0, 0.0
    for ready, n in profile.buckets(bucket_bytes):
        encode = codec_s * slow * share * n / G
        extra += encode  # backward stops for the call
        wire = frac * n
        if topk:  # values and indices, one gather each
            t = collective_s(cluster, "gather", wire, 2, cost, slow)
        else:     # the vectors and P; Q later
            t = collective_s(cluster, algorithm, wire / 2, 2, cost, slow)
        engine = max(engine, ready * slow + extra) + t
        ends.append(engine)
        started.append((n, wire))
    backward = profile.backward_s * slow + extra
    t = backward
    for (n, wire), end in zip(started, ends):
        t = max(t, end if topk else ends[-1])
        if not topk:  # Q's all-reduce, behind everything started in backward
            t += collective_s(cluster, algorithm, wire / 2, 1, cost, slow)
        t += codec_s * slow * (1 - share) * n / G
    return backward, t


def hop_s(cluster: Cluster) -> float:
    """A message's wait for its receiver to be scheduled (0 with a core per rank)."""
    return HOP_S * (cluster.slowdown() - 1)


def collective_s(cluster: Cluster, algorithm: str, wire: float, count: int,
                 cost: CostModel, slow: float) -> float:
    """``count`` collectives in a row, ``wire`` bytes per rank in all (split among them),
    with ``algorithm`` ("gather": the engine's ring all-gather, p - 1 messages, every rank
    receiving the others' bytes): the ranks' own work or the busiest link, whichever is
    longer, plus each message's alpha and latency and each collective's scheduling wait."""
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
        local = count * (moved * beta + reduced * cost.gamma) * slow
        if algorithm == "shm":
            local *= SHM_HOOK_TRAFFIC  # no resident buckets behind a hook
        net = network_time(cluster.topology, algorithm, int(wire)) if cluster.hosts > 1 else 0.0
    return max(local, net) + count * (messages * (alpha * slow + latency) + hop_s(cluster))
