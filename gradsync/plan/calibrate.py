"""`gradsync plan --lab --calibrate`: measure this machine's shared-core constants
(machine.py) from a short sweep of lab runs, as docs/plan.md says the defaults were read
from a Xeon's runs by hand.

The sweep: digits-mlp (the smallest built-in workload: its steps are messages and wake-ups,
not bytes), links of 1 Gbit, one rank per host, each run's CPU accounted over a window of
its steps (cpuwindow.py):

- a one-rank run (``--arch local``, one thread): ``loop_cpu_s`` = its CPU per step less the profile's
  compute (what the training loop adds around the profiled step);
- native All-Reduce on 2, 4 and 6 hosts: ``endpoint_cpu_s`` = the median over the runs of
  (the machine's busy CPU per step - workers x (profiled step + loop)) / message ends,
  with the ends the model's own (predict.cpu_work);
- gradsync's ring on 4 and 6 hosts: ``own_endpoint_cpu_s``, the same for gradsync's own
  collectives (on the caller's thread: no hand-off to gloo's);
- the Parameter Server with one server on 4 and 6 hosts: ``ps_endpoint_cpu_s``, the same
  with the server's sums and optimizer also subtracted;
- ``wake_s``, the one constant no CPU account gives (how long a woken rank waits for a
  core): the value, on a grid of 0.05 ms, that makes the model's step times of the runs
  with more ranks than cores closest to the measured ones (the mean absolute relative
  error).

None of these runs is a configuration `gradsync plan --validate` is scored on in
docs/benchmarks.md (C is digits-mlp on 5 hosts). Run it on a quiet machine: the busy CPU
counts every process's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

from .cluster import Cluster
from .cpuwindow import run_accounted
from .machine import DEFAULT, SharedCores
from .predict import Candidate, cpu_work, predict
from .profile import Profile, measure
from .report import lab_flags, workload_flags
from .shared import busy_beyond_ends_s

WORKLOAD, RATE = "digits-mlp", "1gbit"
ALLREDUCE_HOSTS = (2, 4, 6)
OWN_HOSTS = PS_HOSTS = (4, 6)
WAKE_GRID_S = [i * 0.05e-3 for i in range(101)]  # 0 .. 5 ms


@dataclass
class Run:
    candidate: Candidate
    cluster: Cluster
    step_s: float       # the summary's median step
    busy_s: float       # every core's busy time per step over the window

    @property
    def label(self) -> str:
        return f"{self.candidate.label}, {self.cluster.hosts} hosts"


def calibrate(steps: int = 300, say: Callable[[str], None] = print,
              profile: Profile | None = None) -> SharedCores:
    """Run the sweep and fit the constants (about two minutes on 2 cores; root).
    ``profile``: the plan's own, used if it is the sweep's workload measured on loaded
    cores (as every lab plan's is), else the sweep measures one."""
    if profile is None or profile.workload != WORKLOAD or not profile.loaded:
        profile = measure(WORKLOAD, loaded=True)
    say(f"# calibrating the shared-core constants: {WORKLOAD} at {RATE}, {steps} steps a run")
    # One thread, as the profile and each rank of a lab on these cores: a rank alone would
    # take every core, and its idle threads' spinning is no loop's work.
    local = run_accounted([*workload_flags(profile), "--arch", "local", "--workers", "1"],
                          steps, env={"OMP_NUM_THREADS": "1"})
    loop = max(0.0, local["ranks_user"] + local["ranks_system"] - profile.compute_s)
    say(f"one rank, --arch local: {1e3 * local['median_step']:.2f} ms a step, loop "
        f"{1e3 * loop:.3f} ms of CPU beyond the profiled {1e3 * profile.compute_s:.3f}")
    runs = [_run(profile, Candidate("allreduce", "native"), h, steps, say)
            for h in ALLREDUCE_HOSTS]
    runs += [_run(profile, Candidate("allreduce", "ring"), h, steps, say) for h in OWN_HOSTS]
    runs += [_run(profile, Candidate("ps", servers=1), h, steps, say) for h in PS_HOSTS]
    m = SharedCores(_ends_cost(profile, runs, loop, "native"),
                    _ends_cost(profile, runs, loop, "ps"), loop, 0.0,
                    source=f"calibrated here, {time.strftime('%Y-%m-%d %H:%M')}",
                    own_endpoint_cpu_s=_ends_cost(profile, runs, loop, "ring"))
    loaded = [r for r in runs if r.cluster.slowdown() > 1]
    wake = (min(WAKE_GRID_S, key=lambda w: _error(profile, loaded, replace(m, wake_s=w)))
            if loaded else DEFAULT.wake_s)  # a core for every rank: no rank waits for one
    m = replace(m, wake_s=wake)
    _say_fit(profile, runs, m, say)
    return m


def _run(profile: Profile, cand: Candidate, hosts: int, steps: int, say) -> Run:
    cluster = Cluster.parse(hosts, 1, RATE, shared=True)
    got = run_accounted([*workload_flags(profile), *cand.flags(),
                         *lab_flags(cluster, ",".join([RATE] * hosts))], steps)
    run = Run(cand, cluster, got["median_step"], got["busy"])
    say(f"{run.label}: {1e3 * run.step_s:.2f} ms a step, {1e3 * run.busy_s:.2f} ms of busy "
        f"CPU a step")
    return run


def _ends_cost(profile: Profile, runs: list[Run], loop: float, whose: str) -> float:
    """CPU per message end of ``whose`` messages (SharedCores.endpoint_s's key: "native",
    "ring", "ps"): the median over those runs of what their busy CPU holds beyond the
    workers' steps and loops and the servers' work, over the model's message ends."""
    costs = []
    for r in runs:
        work = cpu_work(profile, r.cluster, r.candidate)
        if work.algorithm == whose:
            costs.append(max(0.0, r.busy_s - busy_beyond_ends_s(work, loop)) / work.message_ends)
    return statistics.median(costs)


def _error(profile: Profile, runs: list[Run], machine: SharedCores) -> float:
    """The model's mean absolute relative error on ``runs`` with ``machine``'s constants."""
    return statistics.fmean(
        abs(predict(profile, replace(r.cluster, machine=machine), r.candidate).step_s
            - r.step_s) / r.step_s for r in runs)


def _say_fit(profile: Profile, runs: list[Run], fitted: SharedCores, say) -> None:
    """The constants beside the ones they replace, and each run's predicted step with
    both."""
    before = runs[0].cluster.machine
    for name, whose in (("endpoint_cpu_s", "native"), ("own_endpoint_cpu_s", "ring"),
                        ("ps_endpoint_cpu_s", "ps")):
        say(f"{name:18} {1e3 * before.endpoint_s(whose):6.3f} ms -> "
            f"{1e3 * fitted.endpoint_s(whose):6.3f} ms")
    for name in ("loop_cpu_s", "wake_s"):
        say(f"{name:18} {1e3 * getattr(before, name):6.3f} ms -> "
            f"{1e3 * getattr(fitted, name):6.3f} ms")
    say(f"{'run':28} {'measured':>9} {'before':>9} {'after':>9}  (ms a step)")
    for r in runs:
        was, now = (predict(profile, replace(r.cluster, machine=m), r.candidate).step_s
                    for m in (before, fitted))
        say(f"{r.label:28} {1e3 * r.step_s:9.2f} {1e3 * was:9.2f} {1e3 * now:9.2f}")
