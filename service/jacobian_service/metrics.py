"""Prometheus collectors, one registry per app (never the process-global default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "jacobian_service_requests",
            "Requests answered, by function, endpoint, status and problem code.",
            ["function", "endpoint", "status", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "jacobian_service_latency_seconds",
            "Time spent per request, split by phase (queue, compute, encode, total).",
            ["endpoint", "phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "jacobian_service_batch_size",
            "Requests stacked into one engine call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge("jacobian_service_queue_depth", "Jobs queued or running.", registry=r)
        self.streamed_bytes = Counter(
            "jacobian_service_streamed_bytes", "Bytes of .npy results streamed chunk by chunk.", registry=r
        )
        self.device_memory = Gauge(
            "jacobian_service_device_memory_bytes", "Memory allocated by torch on each device.", ["device"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
