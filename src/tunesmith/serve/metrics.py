"""Prometheus metrics of one server (its own registry, so several servers/tests in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tunesmith_requests", "Requests by model/adapter, A/B variant and HTTP status",
                                ["adapter", "variant", "status"], registry=r)
        self.prompt_tokens = Counter("tunesmith_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.completion_tokens = Counter("tunesmith_completion_tokens", "Generated tokens", ["adapter"], registry=r)
        self.latency = Histogram("tunesmith_request_latency_seconds", "Request latency (submit to last token)",
                                 ["adapter", "variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tunesmith_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tunesmith_batch_size", "Rows per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("tunesmith_errors", "Error responses by adapter, variant and status",
                              ["adapter", "variant", "status"], registry=r)
        self.feedback = Counter("tunesmith_feedback", "User feedback per A/B alias and variant",
                                ["alias", "variant", "kind"], registry=r)
        self.feedback_score = Counter("tunesmith_feedback_score_sum", "Sum of feedback scores",
                                      ["alias", "variant"], registry=r)
        self.variant_weight = Gauge("tunesmith_ab_weight", "Current A/B weight", ["alias", "variant"], registry=r)

    def watch_engine(self, stats) -> None:
        """Export `stats()` (Engine.stats: adapter cache and engine counters) at every scrape."""
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's and adapter cache's counters at scrape time (they live on the engine thread)."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for key in ("hits", "misses", "loads", "evictions", "load_errors"):
            c = CounterMetricFamily(f"tunesmith_adapter_cache_{key}", f"Adapter cache {key}")
            c.add_metric([], stats[key])
            yield c
        for key in ("hot", "registered", "loading", "pinned", "slot_bytes", "budget_bytes"):
            g = GaugeMetricFamily(f"tunesmith_adapter_cache_{key}", f"Adapter cache {key}")
            g.add_metric([], stats[key])
            yield g
        c = CounterMetricFamily("tunesmith_cancelled_requests", "Requests cancelled (client gone or too slow)")
        c.add_metric([], stats["cancelled"])
        yield c
        for key, help_text in (("running", "Rows in the running batch"), ("pending", "Requests waiting to start")):
            g = GaugeMetricFamily(f"tunesmith_{key}_requests", help_text)
            g.add_metric([], stats[key])
            yield g
