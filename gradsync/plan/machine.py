"""The constants of ranks that share one machine's cores (shared.py's model): what a message
end, a rank's training loop and a woken rank's wait for a core cost **on this machine**.

They belong to the machine, not to gradsync: the same lab runs measured a 5-host native
all-reduce at 11.85 ms a step on a 2-core Intel Xeon and 21.19 ms on a 2-core AMD EPYC
(docs/benchmarks.md section 16). ``DEFAULT`` holds the Xeon's figures, read from its lab
runs by hand (docs/plan.md); `gradsync plan --lab --calibrate` measures this machine's
(calibrate.py) and keeps them in ``$GRADSYNC_CACHE/shared-cores.json`` (default
~/.cache/gradsync), which later plans of a lab on the same machine read (:func:`here`). The
file names the machine it was measured on (CPU model, cores); on another it is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "shared-cores.json"


@dataclass(frozen=True)
class SharedCores:
    endpoint_cpu_s: float
    """CPU per message end of a collective (a send or a receive, the kernel's forwarding
    through the lab's bridge included)."""
    ps_endpoint_cpu_s: float
    """The same for the Parameter Server's own messages (pushes, replies)."""
    loop_cpu_s: float
    """CPU per step of the training loop outside the profiled step, per worker (metrics,
    the loss's ``item()``, the sampler)."""
    wake_s: float
    """A woken receiver's wait for a core when every core is taken."""
    source: str = "defaults"
    """Where the figures come from, said in the plan's header."""
    own_endpoint_cpu_s: float | None = None
    """CPU per message end of gradsync's own collectives (ring, aware, hierarchical), which
    run on the caller's thread; None: as gloo's (``endpoint_cpu_s``)."""

    def endpoint_s(self, algorithm: str) -> float:
        """CPU per message end of ``algorithm``'s messages: "ps" (the PS's own), gloo's
        ("native", "gather": the engine's all-gather), or one of gradsync's own."""
        if algorithm == "ps":
            return self.ps_endpoint_cpu_s
        if algorithm in ("native", "gather") or self.own_endpoint_cpu_s is None:
            return self.endpoint_cpu_s
        return self.own_endpoint_cpu_s

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self), "machine": fingerprint()}, indent=1) + "\n")
        os.replace(tmp, path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> "SharedCores | None":
        """The figures in ``path`` if they were measured on this machine, else None."""
        try:
            raw = json.loads(path.read_text())
            if raw.pop("machine", None) != fingerprint():
                log.warning("%s was measured on another machine; using the defaults", path)
                return None
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("cannot read %s (%s); using the defaults", path, exc)
            return None


# The Xeon's lab runs (docs/plan.md, "Where each constant comes from"): ENDPOINT_CPU_S the
# median over plain and PowerSGD all-reduces on 2, 3, 4 and 6 hosts at 1 Gbit of (busy CPU
# per step - workers x (profiled step + loop)) / message ends; the PS k = 1 runs' the same;
# LOOP_CPU_S a one-rank run's user CPU per step (1.19 ms) less its profile's compute
# (0.41 ms); WAKE_S fitted to the step times of the 3, 4 and 6-host runs.
DEFAULT = SharedCores(endpoint_cpu_s=0.14e-3, ps_endpoint_cpu_s=0.21e-3, loop_cpu_s=0.78e-3,
                      wake_s=0.75e-3, source="defaults (a 2-core Intel Xeon's lab runs)")


def fingerprint() -> dict:
    """What makes two machines' figures comparable: the CPU model and the cores."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "arch": platform.machine()}


def cache_path() -> Path:
    from ..env import cache_dir

    return Path(cache_dir()) / FILE


def here() -> SharedCores:
    """This machine's calibrated figures if `gradsync plan --lab --calibrate` saved them,
    else the defaults."""
    return SharedCores.load(cache_path()) or DEFAULT
