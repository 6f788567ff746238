"""Predict one step's time for each configuration, from a profile and a cluster.

A step is the forward pass, then backward with the communication overlapped, then the
optimizer (on the workers for all-reduce, on the servers for the PS)::

    step = D + F + max(B, end of the last transfer) + O         (times scaled by the slowdown
                                                              of ranks sharing cores)

The gradients leave in chunks (all-reduce: DDP's buckets of ``bucket_mb``; PS: partitions)
as backward makes them ready; chunk i starts when it is ready and the chunk before it is
done, and lasts d_i::

    end_0 = r_0 + d_0,   end_i = max(r_i, end_{i-1}) + d_i

All-reduce, chunk of n bytes (c the compressor's wire fraction, e its encode+decode share):
d = max(the ranks' own work, the busiest host link) + messages x latency + e, from the
cost model of ``algorithm="auto"`` (comm/cost_model.py: per-algorithm alpha and beta for
the CPU side, the topology's links for the wire). top-k and PowerSGD, whose hooks encode
inside backward and decode and (PowerSGD) all-reduce again after it: hooks.py.

Parameter Server with k dedicated server ranks (ranks 0..k-1, as gradsync places them) and
N = ranks - k workers, server s holding a share g_s of the G gradient bytes (by its link
when links are unequal): every worker pushes c g_s to each server and pulls g_s back, so a
host's link carries, each way, the bytes of its workers to servers elsewhere and of its
servers to workers elsewhere; the wire time is the busiest host's bytes over its rate. A
server also sums N pushes and steps its shard (N g_s gamma + O g_s / G), and each message
costs ``PS_MESSAGE_S`` of Python at both ends; a partition lasts the longer of its wire
time and that work, since the pipeline overlaps them.

Ranks that share one machine's cores (a lab): each message of a collective costs a hop
that grows with the ranks per core, and no step is shorter than all ranks' CPU work over
the cores (shared.py).

Each prediction names its bottleneck: "compute" when the transfers hide behind backward,
else the busiest link ("link of host 3"), "server CPU", or "latency" (per-message costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..comm.algorithms.registry import REGISTRY
from ..comm.cost_model import DEFAULT_COST_MODEL, CostModel, network_time, shape
from .cluster import Cluster
from .hooks import SHM_HOOK_TRAFFIC, collective_s, critical_messages, hook_step, hooked
from .loaded import stretched
from .profile import Profile
from .shared import CpuWork, collective_ends, cpu_floor_s, fan, load, wake_s

PS_MESSAGE_S = 150e-6  # a push or a reply handled in Python, each end (fitted: docs/plan.md)
HALF_CASTS = ("fp16", "bf16")


@dataclass(frozen=True)
class Candidate:
    arch: str                  # "allreduce" | "ps"
    algorithm: str = "native"  # all-reduce
    servers: int = 0           # ps
    compression: str = "none"
    bucket_mb: float = 25.0

    def flags(self) -> list[str]:
        out = ["--arch", self.arch]
        out += (["--algorithm", self.algorithm] if self.arch == "allreduce"
                else ["--servers", str(self.servers)])
        if self.compression != "none":
            out += ["--compression", self.compression]
        return out

    @property
    def label(self) -> str:
        what = (f"allreduce {self.algorithm}" if self.arch == "allreduce"
                else f"ps k={self.servers}")
        return what + (f" {self.compression}" if self.compression != "none" else "")


@dataclass
class Prediction:
    candidate: Candidate
    workers: int
    step_s: float
    compute_s: float
    exposed_s: float  # what the transfers add after backward
    bottleneck: str

    def samples_per_s(self, batch: int) -> float:
        return self.workers * batch / self.step_s


def candidates(cluster: Cluster, profile: Profile, compression: bool = True
               ) -> list[Candidate]:
    """What gradsync can run on ``cluster``: the all-reduce algorithms that fit its shape,
    a PS with k = 1 .. ranks/2 servers, each plain and (``compression``) compressed."""
    algos = ["native", "ring"]
    if cluster.hosts == 1:
        algos.append("shm")
    else:
        if cluster.unequal:
            algos.append("aware")
        if cluster.procs_per_host > 1:
            algos.append("hierarchical")
    codecs = ["none", *profile.codecs] if compression else ["none"]
    # top-k all-gathers whatever the algorithm: one candidate (native) for it.
    out = [Candidate("allreduce", a, compression=c) for a in algos for c in codecs
           if a == "native" or not c.startswith("topk")]
    for k in range(1, cluster.ranks // 2 + 1):
        out += [Candidate("ps", servers=k, compression=c) for c in codecs
                if not c.startswith("powersgd")]
    return out


def overlap(chunks: list[tuple[float, float]]) -> float:
    """End of the last of the transfers (ready time, duration), one at a time in order."""
    end = 0.0
    for ready, duration in chunks:
        end = max(end, ready) + duration
    return end


def predict(profile: Profile, cluster: Cluster, cand: Candidate,
            cost: CostModel = DEFAULT_COST_MODEL) -> Prediction:
    ranks = cluster.ranks
    workers = ranks - cand.servers if cand.arch == "ps" else ranks
    slow = cluster.slowdown()
    if cand.arch == "allreduce":  # a DataParallel rank's compute on loaded cores (loaded.py)
        profile = stretched(profile, load(cluster))
    f, b = (profile.data_s + profile.forward_s) * slow, profile.backward_s * slow
    frac = profile.codecs.get(cand.compression, (0.0, 1.0))[1]
    codec_s = _codec_s(profile, cluster, cand) * slow
    if cand.arch == "allreduce" and hooked(cand.compression) and ranks > 1:
        backward, end = hook_step(profile, cluster, cand.algorithm, cand.compression,
                                  cand.bucket_mb * (1 << 20), cost, slow)
        exposed, opt = end - b, profile.optimizer_s * slow
        bottleneck = ("compute" if exposed < 0.05 * (f + end + opt)
                      else _link_bottleneck(cluster, cand) if frac * profile.grad_bytes
                      / min(cluster.rates) > 0.5 * (end - backward) else "latency (messages)")
        floor = cpu_floor_s(cluster, cpu_work(profile, cluster, cand, cost))
        return _floored(Prediction(cand, workers, f + end + opt, f + b + opt, exposed,
                                   bottleneck), floor)
    if cand.arch == "allreduce":
        chunks = profile.chunks(cand.bucket_mb * (1 << 20))
        timed = [(r * slow, _all_reduce_s(cluster, cand, n, frac, cost, slow)
                  + codec_s * n / profile.grad_bytes) for r, n in chunks]
        opt = profile.optimizer_s * slow
        wire = frac * profile.grad_bytes / min(cluster.rates)  # the slowest link's share
        bottleneck = (_link_bottleneck(cluster, cand) if cluster.hosts == 1
                      or wire > 0.5 * sum(d for _, d in timed) else "latency (messages)")
    else:
        timed, bottleneck = _ps_chunks(profile, cluster, cand, frac, codec_s, slow, cost)
        opt = 0.0  # the servers step, inside the chunks' time
    end = overlap(timed)
    exposed = max(0.0, end - b)
    step = f + b + exposed + opt
    if exposed < 0.05 * step:
        bottleneck = "compute"
    return _floored(Prediction(cand, workers, step, f + b + opt, exposed, bottleneck),
                    cpu_floor_s(cluster, cpu_work(profile, cluster, cand, cost)))


def _codec_s(profile: Profile, cluster: Cluster, cand: Candidate) -> float:
    """CPU seconds ``cand``'s compressor adds to a worker's step: an all-reduce's hook at
    the lab's load (loaded.py); the PS's pushes, which compress outside any hook, at the
    one-rank timing."""
    return profile.codec(cand.compression,
                         load(cluster) if cand.arch == "allreduce" else None)[0]


def _floored(pred: Prediction, floor: float) -> Prediction:
    """``pred``, or the CPU budget's step where that is longer (shared.py)."""
    if floor <= pred.step_s:
        return pred
    return replace(pred, step_s=floor, exposed_s=pred.exposed_s + floor - pred.step_s,
                   bottleneck="CPU (ranks sharing cores)")


def cpu_work(profile: Profile, cluster: Cluster, cand: Candidate, cost: CostModel
             = DEFAULT_COST_MODEL) -> CpuWork | None:
    """All ranks' CPU per step in a lab (shared.py's budget): each worker's profiled step
    and codec, the servers' sums and optimizer, and the message ends of the step's
    collectives (PS: a push and a reply per worker and partition)."""
    if not cluster.cores or cluster.hosts == 1:
        return None  # one host: shared memory and loopback, the cost model's own terms
    p, G = cluster.ranks, profile.grad_bytes
    codec_s = _codec_s(profile, cluster, cand)
    if cand.arch == "ps":
        workers = p - cand.servers
        share = math.ceil(G / cand.servers / _partition_bytes(cluster, cand.servers))
        partitions = cand.servers * share  # each server's shard cut into partitions
        return CpuWork(profile.compute_s - profile.optimizer_s + codec_s, workers,
                       workers * G * cost.gamma + profile.optimizer_s, 4 * workers * partitions,
                       "ps")
    algo = cand.algorithm if cand.algorithm in REGISTRY else "native"
    buckets = len(profile.buckets(cand.bucket_mb * (1 << 20)))
    if cand.compression.startswith("topk"):
        ends = buckets * 2 * collective_ends(p - 1, p)
    else:
        count = 2 if cand.compression.startswith("powersgd") else buckets
        messages = critical_messages(cluster, algo, shape(algo, G / count, p)[0])
        ends = count * collective_ends(messages * fan(algo, p), p)
    return CpuWork(profile.compute_s + codec_s, p, 0.0, ends,
                   "gather" if cand.compression.startswith("topk") else algo)


def _partition_bytes(cluster: Cluster, servers: int) -> int:
    """The run's default partition, servers on ranks 0..servers-1."""
    from ..ps.placement import fan_in
    from ..ps.sharding import partition_bytes_for

    pushes = fan_in(lambda r: r // cluster.procs_per_host, list(range(servers)),
                    list(range(servers, cluster.ranks)))
    return partition_bytes_for(min(cluster.rates), pushes)


def _all_reduce_s(cluster: Cluster, cand: Candidate, n: float, frac: float,
                  cost: CostModel, slow: float = 1.0) -> float:
    """One chunk of ``n`` dense bytes, plain or cast to halves (top-k and PowerSGD:
    hooks.py): the ranks' own work (the cost model's alphas and betas, slowed on shared
    cores) or the busiest link, whichever is longer, plus each message's latency."""
    p = cluster.ranks
    if p <= 1:
        return 0.0
    algo = cand.algorithm if cand.algorithm in REGISTRY else "native"
    wire = n * frac
    if cluster.hosts > 1:  # bytes or link, then each message's latency and hop
        return collective_s(cluster, algo, wire, 1, cost, slow)
    messages = shape(algo, float(wire), p)[0]
    # One host has no wire: the all-reduce is the ranks' own work, and a half cast keeps
    # every element to add (CPU adds halves element by element, no faster than floats).
    work = n if cluster.hosts == 1 and cand.compression in HALF_CASTS else wire
    local = cost.predict(algo, int(work), p) * slow
    if algo == "shm" and cand.compression != "none":
        local *= SHM_HOOK_TRAFFIC  # no resident buckets behind a hook
    net = network_time(cluster.topology, algo, int(wire)) if cluster.hosts > 1 else 0.0
    return max(local, net) + messages * cluster.latency_s


def _link_bottleneck(cluster: Cluster, cand: Candidate) -> str:
    if cluster.hosts == 1:
        return "memory copies"
    if cand.algorithm == "aware" or not cluster.unequal:
        return "links (all equally busy)"
    return f"link of host {cluster.rates.index(min(cluster.rates))}"


def _ps_chunks(profile: Profile, cluster: Cluster, cand: Candidate, frac: float,
               codec_s: float, slow: float, cost: CostModel):
    """The partitions as (ready, duration), and the bottleneck, for a PS candidate."""
    k, L, G = cand.servers, cluster.procs_per_host, profile.grad_bytes
    workers = cluster.ranks - k
    server_rates = [cluster.rates[s // L] for s in range(k)]
    weights = server_rates if cluster.unequal else [1.0] * k
    share = [w / sum(weights) for w in weights]
    # Bytes each host sends and receives per step (pushes out = frac g_s, pulls g_s).
    out_b, in_b = [0.0] * cluster.hosts, [0.0] * cluster.hosts
    for s in range(k):
        hs, g = s // L, share[s] * G
        for w in range(k, cluster.ranks):
            hw = w // L
            if hw != hs:
                out_b[hw] += frac * g
                in_b[hs] += frac * g
                out_b[hs] += g
                in_b[hw] += g
    wire_s = [max(o, i) / r for o, i, r in zip(out_b, in_b, cluster.rates)]
    busiest = max(range(cluster.hosts), key=lambda h: wire_s[h])
    # The busiest server's CPU: sum N pushes, step its shard (on shared cores, slowed).
    cpu_s = max(share) * (workers * G * cost.gamma + profile.optimizer_s) * slow
    chunks = profile.chunks(_partition_bytes(cluster, cand.servers))
    per_chunk = 2 * PS_MESSAGE_S * slow * max(workers / max(k, 1), 1)
    # The wire and the two ends' Python run at once on different partitions (pipelined).
    # A push and its reply each wait for their receiver to get a core (shared.wake_s).
    timed = [(r * slow, max(wire_s[busiest] * n / G, (cpu_s + codec_s) * n / G + per_chunk)
              + 2 * (cluster.latency_s + wake_s(cluster))) for r, n in chunks]
    if cpu_s > wire_s[busiest] and cpu_s > per_chunk * len(chunks):
        bottleneck = "server CPU"
    elif per_chunk * len(chunks) > wire_s[busiest]:
        bottleneck = "latency (messages)"
    else:
        bottleneck = f"link of host {busiest}"
    return timed, bottleneck


def rank(profile: Profile, cluster: Cluster, cands: list[Candidate],
         cost: CostModel = DEFAULT_COST_MODEL) -> list[Prediction]:
    """Every candidate's prediction, the highest throughput (samples/s) first."""
    preds = [predict(profile, cluster, c, cost) for c in cands]
    return sorted(preds, key=lambda p: -p.samples_per_s(profile.batch))
