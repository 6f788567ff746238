"""The observability section of `gradsync train`'s configuration (docs/observability.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flags import at_least as _at_least
from ..flags import flag_meta as _help


@dataclass
class ObserveConfig:
    """Observability."""

    timeline: str | None = field(default=None, metadata=_help(
        "write a Chrome-trace timeline of every rank to this JSON file (Perfetto, "
        "chrome://tracing); each rank writes FILE.rank<N> as it runs, rank 0 merges them"))
    tensorboard: str | None = field(default=None, metadata=_help(
        "write TensorBoard scalars (rank 0) under this directory"))
    plots: bool = field(default=True, metadata=_help(
        "with --out DIR: draw the loss, accuracy and step-time plots into DIR/plots at the "
        "end (needs matplotlib)"))
    straggler_window: int = field(default=20, metadata=_help(
        "every this many steps, name a worker whose compute time stayed above 1.2x the "
        "workers' median (one small all-gather); 0: off"))

    def __post_init__(self) -> None:
        _at_least(self.straggler_window, 0, "straggler-window")
