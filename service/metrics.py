"""Prometheus metrics of the service, right with any number of replicas.

Every observation lands in the replica's own registry and, in a Ray actor (a Serve replica), in
Ray's metrics pipeline too: Ray's agent on every node exports the metrics of every
process on that node (names prefixed `ray_`, on the node's `metrics_export_port`, which is what a
PodMonitor scrapes on every Ray pod). `/metrics` answers with the cluster's totals under Ray
(`cluster_exposition`: every alive node's export, prefloop's families only, summed over Ray's own
labels such as the worker and the node), so a scrape through the proxy no longer sees one replica
at random; outside Ray (the fast tests build the app alone) it answers with the replica's registry.

Ray's pipeline reports every few seconds (`RAY_metrics_report_interval_ms`, 10 s by default), so
the totals lag by that much; a histogram's `_sum` from Ray is estimated from bucket midpoints
(quantiles from the buckets are exact to the bucket).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
RAY_PREFIX = "ray_"
NODE_TIMEOUT_S = 2.0


def _in_ray_actor() -> bool:
    """This process is a Ray actor (a Serve replica), not a driver that merely joined Ray."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class _Child:
    def __init__(self, local: Any, remote: Any, tags: dict[str, str]):
        self._local, self._remote, self._tags = local, remote, tags

    def inc(self, amount: float = 1.0) -> None:
        self._local.inc(amount)
        if self._remote is not None and amount > 0:
            self._remote.inc(amount, tags=self._tags)

    def observe(self, value: float) -> None:
        self._local.observe(value)
        if self._remote is not None:
            self._remote.observe(value, tags=self._tags)

    def set(self, value: float) -> None:
        self._local.set(value)
        if self._remote is not None:
            self._remote.set(value, tags=self._tags)


class Family:
    """One metric in both places: `labels(...)` then `inc`, `observe` or `set`, or those directly
    on a metric without labels."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        mirror: bool,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ):
        self.name, self.labelnames = name, tuple(labelnames)
        extra: dict[str, Any] = {"buckets": buckets} if kind == "histogram" else {}
        local_cls = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}[kind]
        self._local = local_cls(name, documentation, self.labelnames, registry=registry, **extra)
        self._remote: Any = None
        if mirror:
            from ray.util import metrics as ray_metrics

            if kind == "histogram":
                self._remote = ray_metrics.Histogram(
                    name, documentation, boundaries=list(buckets), tag_keys=self.labelnames
                )
            else:
                remote_cls = ray_metrics.Counter if kind == "counter" else ray_metrics.Gauge
                self._remote = remote_cls(name, documentation, tag_keys=self.labelnames)

    def labels(self, *values: str) -> _Child:
        tags = dict(zip(self.labelnames, values, strict=True))
        return _Child(self._local.labels(*values), self._remote, tags)

    def inc(self, amount: float = 1.0) -> None:
        _Child(self._local, self._remote, {}).inc(amount)

    def observe(self, value: float) -> None:
        _Child(self._local, self._remote, {}).observe(value)

    def set(self, value: float) -> None:
        _Child(self._local, self._remote, {}).set(value)


class Metrics:
    def __init__(self, in_flight: Callable[[], float], mirror: bool | None = None):
        self.registry = CollectorRegistry()
        self.mirrored = _in_ray_actor() if mirror is None else mirror
        self._in_flight = in_flight

        def family(kind: str, name: str, doc: str, *labels: str, **kw: Any) -> Family:
            return Family(kind, name, doc, labels, self.registry, self.mirrored, **kw)

        self.requests = family(
            "counter", "prefloop_requests", "HTTP requests by route and status", "route", "status"
        )
        self.latency = family(
            "histogram", "prefloop_request_latency_seconds", "time to the full response", "route"
        )
        self.ttft = family(
            "histogram", "prefloop_time_to_first_token_seconds", "chat: request to first text"
        )
        self.tokens = family(
            "counter", "prefloop_tokens", "tokens processed", "kind", "model_version"
        )
        self.feedback = family(
            "counter",
            "prefloop_feedback",
            "feedback events stored",
            "kind",
            "value",
            "model_version",
        )
        self.engine_queue = family(
            "gauge", "prefloop_engine_requests_in_flight", "requests the engine runs or queues"
        )
        self.swaps = family(
            "counter", "prefloop_swaps", "engine weight swaps by the version swapped to", "version"
        )
        self.swap_seconds = family(
            "histogram",
            "prefloop_swap_seconds",
            "time to load a version into the engine",
            buckets=SWAP_BUCKETS,
        )
        self.store_outage = family(
            "gauge",
            "prefloop_store_outage",
            "1 while the database is unreachable and writes go to the local journal",
        )
        self.journal_bytes = family(
            "gauge", "prefloop_journal_bytes", "bytes in the local journal, waiting for replay"
        )
        self.journal_records = family(
            "counter",
            "prefloop_journal_records",
            "journaled writes by outcome: journaled, replayed, rejected, refused (journal "
            "full), held (a replay attempt deferred: the response is not stored yet)",
            "outcome",
        )
        self.families = [
            self.requests,
            self.latency,
            self.ttft,
            self.tokens,
            self.feedback,
            self.engine_queue,
            self.swaps,
            self.swap_seconds,
            self.store_outage,
            self.journal_bytes,
            self.journal_records,
        ]

    def sample_in_flight(self) -> None:
        """Record the engine's current queue (called as requests start and end)."""
        self.engine_queue.set(self._in_flight())

    def render(self) -> bytes:
        """This replica's metrics in the Prometheus text format."""
        self.sample_in_flight()
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """What `/metrics` answers: the cluster's totals where mirrored to Ray, else `render`."""
        if not self.mirrored:
            return self.render()
        self.sample_in_flight()
        return await cluster_exposition({f.name: f.labelnames for f in self.families})


async def cluster_exposition(families: dict[str, tuple[str, ...]]) -> bytes:
    """Every alive Ray node's metrics export, reduced to `families` (name -> label names) and
    summed over every other label."""
    import httpx
    import ray

    nodes = await asyncio.to_thread(ray.nodes)
    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in nodes
        if node.get("Alive") and node.get("MetricsExportPort")
    ]
    async with httpx.AsyncClient(timeout=NODE_TIMEOUT_S) as client:
        answers = await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True)
    texts = []
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, httpx.Response) and answer.status_code == 200:
            texts.append(answer.text)
        else:
            logger.warning("no metrics from %s: %s", url, answer)
    return merge_expositions(texts, families)


def merge_expositions(texts: Iterable[str], families: dict[str, tuple[str, ...]]) -> bytes:
    """Sum the samples of `families` (their names without Ray's `ray_` prefix) across `texts`,
    keeping only each family's own labels (and a histogram's `le`)."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for parsed in text_string_to_metric_families(text):
            name = parsed.name.removeprefix(RAY_PREFIX)
            if not parsed.name.startswith(RAY_PREFIX) or name not in families:
                continue
            keep = (*families[name], "le")
            if name not in merged:
                merged[name] = Metric(name, parsed.documentation, parsed.type)
                sums[name] = {}
            for sample in parsed.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in keep))
                key = (sample.name.removeprefix(RAY_PREFIX), labels)
                sums[name][key] = sums[name].get(key, 0.0) + sample.value
    for name, metric in merged.items():
        for (sample_name, labels), value in sums[name].items():
            metric.add_sample(sample_name, dict(labels), value)

    class _Merged:
        def collect(self) -> list[Metric]:
            return [merged[name] for name in sorted(merged)]

    registry = CollectorRegistry()
    registry.register(_Merged())
    return generate_latest(registry)
