"""What `GET /metrics` reports, in Prometheus's text format.

One registry per front process (no module-level metrics), so two servers in one process
(tests) never mix their counts; every series but the request counter's unknown-model one is
labelled by model. With --frontends N, each front counts what it answered.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServeMetrics:
    """The server's counters: requests, rows, batch sizes, latency, and per replica."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gradsync_serve_requests", "inference requests answered, "
                                "by HTTP status", ["model", "code"], registry=r)
        self.rows = Counter("gradsync_serve_rows", "rows inferred", ["model"], registry=r)
        self.latency = Histogram("gradsync_serve_request_latency_seconds", "time from a "
                                 "request's arrival to its answer", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("gradsync_serve_batch_rows", "rows per dynamic batch",
                                    ["model"], buckets=_ROW_BUCKETS, registry=r)
        self.replica_jobs = Counter("gradsync_serve_replica_jobs", "pieces of batches a "
                                    "replica computed", ["model", "replica"], registry=r)
        self.replica_rows = Counter("gradsync_serve_replica_rows", "rows a replica computed",
                                    ["model", "replica"], registry=r)
        self.replica_restarts = Counter("gradsync_serve_replica_restarts", "replicas that "
                                        "died and were replaced", ["model", "replica"],
                                        registry=r)
        self.retries = Counter("gradsync_serve_retries", "pieces of batches sent again "
                               "after their replica died", ["model"], registry=r)
        self.replicas_live = Gauge("gradsync_serve_replicas_live", "replicas ready to "
                                   "compute", ["model"], registry=r)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
