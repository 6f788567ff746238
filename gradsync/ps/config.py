"""A parameter server's configuration: one validated dataclass, shared by the servers and the
Parameter-Server architecture that builds it from the run's flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..compress.spec import Compression
from .compression import check_compression
from .consistency import MODES


@dataclass
class ServerConfig:
    consistency: str = "sync"
    """sync | async | ssp."""
    staleness: int = 0
    """The s of ssp: no worker runs more than s steps ahead of the slowest."""
    max_steps: int | None = None
    """Pushes of steps >= this are rejected (None: no limit)."""
    nonfinite: str = "error"
    """A pushed gradient with NaN or Inf: "error" rejects it like a malformed message (sync:
    the run stops naming rank and step; async/ssp: the sender is dropped, the others train
    on); "skip" leaves it out (async/ssp: that push updates nothing; sync: the shard skips
    the whole step's update, for every worker; each server decides for its own shard, so
    the other shards of that step may still be updated) and logs a warning."""
    compression: str | Compression = "none"
    """The compressed pushes taken beside dense ones: none, fp16, bf16 or topk:RATIO
    (``compression.py``; parsed, so that workers and servers agree on the exact ratio)."""
    elastic: bool = False
    """sync: a lost worker (or one whose message is malformed) is dropped and the others
    train on, as async and ssp always do, instead of stopping the run; every mode: see
    ``min_workers``."""
    min_workers: int = 1
    """With ``elastic``: a drop that leaves fewer live workers than this stops the run."""

    def __post_init__(self):
        if self.consistency not in MODES:
            raise ValueError(f"consistency must be one of {', '.join(MODES)}, not "
                             f"{self.consistency!r}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, not {self.staleness}")
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', not {self.nonfinite!r}")
        if self.min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, not {self.min_workers}")
        self.compression = check_compression(self.compression)  # ValueError: what is wrong
