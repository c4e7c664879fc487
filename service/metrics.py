"""Prometheus metrics of one replica, in a registry of their own (one per app: tests build many)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, in_flight: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefloop_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "prefloop_request_latency_seconds",
            "time to the full response by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "prefloop_time_to_first_token_seconds",
            "chat: request to first generated text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "prefloop_tokens", "tokens processed", ["kind", "model_version"], registry=r
        )
        self.feedback = Counter(
            "prefloop_feedback",
            "feedback events stored",
            ["kind", "value", "model_version"],
            registry=r,
        )
        self.engine_queue = Gauge(
            "prefloop_engine_requests_in_flight",
            "requests the engine is running or queueing",
            registry=r,
        )
        self.engine_queue.set_function(in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
