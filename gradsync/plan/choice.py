"""Choose: the configuration with the best predicted throughput among those a run allows,
and the one line that says why (``gradsync train --arch auto``; scripts).

    from gradsync.plan import Cluster, choose, measure

    choice = choose(measure("digits-wide", steps=6),
                    Cluster.parse(3, rates="1gbit,1gbit,100mbit"))
    choice.candidate.flags()  # ['--arch', 'allreduce', '--algorithm', 'aware'] or the like
    print(choice.line())      # what it chose, its predicted ms/step, the runner-up's, why

Without restrictions the choice is `gradsync plan`'s first row for the same profile and
cluster. ``extra_servers``: a PS's k servers are ranks beside the cluster's (gradsync train on
one host keeps its --workers workers and starts the servers too), so each PS candidate is
predicted on ranks + k ranks sharing the cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..comm.cost_model import DEFAULT_COST_MODEL, CostModel
from .cluster import Cluster
from .predict import Candidate, Prediction, candidates, predict
from .profile import Profile


@dataclass(frozen=True)
class Choice:
    """The best prediction and the one after it (None when there was one candidate)."""

    best: Prediction
    runner_up: Prediction | None
    workload: str = ""
    cluster: str = ""

    @property
    def candidate(self) -> Candidate:
        return self.best.candidate

    def line(self, who: str = "--arch auto") -> str:
        """One line: the choice, its predicted ms/step and bottleneck, the runner-up's."""
        best, second = self.best, self.runner_up
        out = (f"{who} chose {best.candidate.label} ({1e3 * best.step_s:.2f} ms/step "
               f"predicted, bottleneck: {best.bottleneck})")
        out += (f"; runner-up {second.candidate.label} ({1e3 * second.step_s:.2f} ms/step)"
                if second else "; no other candidate")
        return out + (f"; {self.workload} on {self.cluster}" if self.workload else "")

    def record(self) -> dict:
        """For summary.json: what was chosen and the predictions behind it."""
        def row(p: Prediction | None) -> dict | None:
            return p and {"configuration": p.candidate.label, "flags": p.candidate.flags(),
                          "predicted_step_ms": 1e3 * p.step_s, "bottleneck": p.bottleneck}
        return {"chosen": row(self.best), "runner_up": row(self.runner_up),
                "cluster": self.cluster}


def choose(profile: Profile, cluster: Cluster, *, arch: str = "any",
           compression: str | None = None, algorithm: str | None = None,
           servers: int | None = None, extra_servers: bool = False,
           cost: CostModel = DEFAULT_COST_MODEL) -> Choice:
    """The highest predicted samples/s among the configurations allowed.

    Args:
        profile: the workload measured (:func:`gradsync.plan.measure`).
        cluster: where it runs.
        arch: "any", "allreduce" or "ps".
        compression: None: plain or any compressor the profile measured; else only that
            one ("none": uncompressed).
        algorithm: only all-reduce with this algorithm (None: any that fits the cluster).
        servers: only the PS with this many servers.
        extra_servers: the PS's servers are extra ranks (one host only), see the module.
    Returns:
        The :class:`Choice`.
    Raises:
        ValueError: nothing is left, or the profile lacks the compressor asked for.
    """
    if compression not in (None, "none") and compression not in profile.codecs:
        raise ValueError(f"the profile has no measurement of --compression {compression}")
    if extra_servers and cluster.hosts != 1:
        raise ValueError("extra_servers describes one host")
    cands = candidates(cluster, profile, compression != "none")
    codecs = sorted({c.compression for c in cands})
    if algorithm is not None and servers is not None:
        cands = []  # an all-reduce algorithm and PS servers: no such run
    elif algorithm is not None:  # asked for: a candidate even where plan would not list it
        cands = [Candidate("allreduce", algorithm, compression=c) for c in codecs]
    elif servers is not None and (extra_servers or servers < cluster.ranks):
        cands = [Candidate("ps", servers=servers, compression=c) for c in codecs
                 if not c.startswith("powersgd")]  # (the PS takes no PowerSGD)
    cands = [c for c in cands if arch in ("any", c.arch)
             and compression in (None, c.compression)
             and servers in (None, c.servers if c.arch == "ps" else None)]
    if not cands:
        raise ValueError("no configuration gradsync can run fits these restrictions")
    preds = [predict(profile, _cluster_for(cluster, c, extra_servers), c, cost)
             for c in cands]
    # The PS's servers train nothing: rank by samples/s, as `gradsync plan` does.
    preds.sort(key=lambda p: -p.samples_per_s(profile.batch))
    return Choice(preds[0], preds[1] if len(preds) > 1 else None, profile.workload,
                  cluster.describe())


def _cluster_for(cluster: Cluster, cand: Candidate, extra_servers: bool) -> Cluster:
    if not (extra_servers and cand.arch == "ps"):
        return cluster
    return replace(cluster, procs_per_host=cluster.procs_per_host + cand.servers)
