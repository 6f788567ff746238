"""What one parameter server measured, and its encoding as the payload of a STATS reply.

The server fills a :class:`ServerStats` as it serves (``server.py``, ``consistency.py``) and
sends it to each worker at the end as float64 (``protocol.Kind.STATS``); the worker decodes it
for the run's summary. Apart from the wire protocol's framing, so that the protocol module
holds only the framing and the checks of a worker's header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HIST_BINS = 16  # staleness histogram: 0..14 and ">= 15"


@dataclass
class ServerStats:
    """What one server measured; the payload of STATS (float64), sent to each worker at the end."""

    updates: int = 0
    pushes: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    busy_s: float = 0.0
    max_staleness: int = 0
    max_lead: int = 0
    rejected: int = 0
    skipped: int = 0  # updates not applied for a non-finite gradient (nonfinite="skip")
    staleness_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    dropped: list[int] = field(default_factory=list)  # group ranks of dropped workers

    def to_tensor(self) -> torch.Tensor:
        dropped_mask = sum(1 << w for w in self.dropped if w < 52)  # exact in float64
        head = [self.updates, self.pushes, self.bytes_received, self.bytes_sent, self.busy_s,
                self.max_staleness, self.max_lead, self.rejected, self.skipped, dropped_mask]
        return torch.tensor(head + self.staleness_hist, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ServerStats":
        v = t.tolist()
        mask = int(v[9])
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), v[4], int(v[5]), int(v[6]),
                   int(v[7]), int(v[8]), [int(x) for x in v[10:]],
                   [w for w in range(52) if mask >> w & 1])

    @staticmethod
    def size() -> int:
        return 10 + HIST_BINS
