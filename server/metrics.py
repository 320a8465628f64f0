"""Prometheus metrics of the gateway (one registry per app, so tests and apps do not collide).

A unit with several gateway processes (`gateway_processes`) runs prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the unit): counters, histograms and the
request gauges are written to files that any process sums up for a scrape. What is computed
at scrape time instead (`live`: queue depth, usage meter; `residency`: adapter tiers, slot
waiters, which only the slot owner knows) is not in those files: a scrape gets this
process's `live` part and the owner's `residency` part.

Label cardinality is bounded: `tenant` takes only admin-created tenant ids, and the
(`tenant`, `adapter`) pairs a gateway reports are capped at `max_label_pairs`; past the cap
new pairs are reported as adapter="other". `adapter` is the adapter name (never the version,
alias or engine name) or "base". `endpoint` and `status` come from fixed small sets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

BASE_LABEL = "base"
OTHER_LABEL = "other"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self, max_label_pairs: int = 2000) -> None:
        self.registry = CollectorRegistry()
        self.live = CollectorRegistry()  # computed from this process's state at scrape time
        self.residency = CollectorRegistry()  # from the adapter slots' owner's state
        r = self.registry
        self._pairs: set[tuple[str, str]] = set()
        self._max_pairs = max_label_pairs
        self._lock = threading.Lock()

        self.requests = Counter("loraplex_requests", "Tenant API requests by outcome",
                                ["tenant", "adapter", "endpoint", "status"], registry=r)
        self.latency = Histogram("loraplex_request_duration_seconds",
                                 "Time from request to the last byte of the answer",
                                 ["endpoint", "stream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds",
                              "Time from request to the first generated text (streaming)",
                              ["tenant"], buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds",
                             "Gap between consecutive streamed chunks",
                             buckets=_ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens (from usage)",
                                     ["tenant", "adapter"], registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens",
                                         "Completion tokens (from usage)",
                                         ["tenant", "adapter"], registry=r)
        self.in_flight = Gauge("loraplex_requests_in_flight",
                               "Tenant API requests being answered", registry=r,
                               multiprocess_mode="livesum")
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Time to load an adapter into a tier",
            ["tier", "source"], buckets=_LOAD_BUCKETS, registry=r)
        self.engine_up = Gauge("loraplex_engine_up", "1 when the engine answers its health check",
                               registry=r, multiprocess_mode="livemax")
        self.training_jobs = Gauge("loraplex_training_jobs", "Fine-tuning jobs by status",
                                   ["status"], registry=r, multiprocess_mode="livemostrecent")
        self.training_progress = Gauge("loraplex_training_progress",
                                       "Share of steps done, per running fine-tuning job "
                                       "(only running jobs are reported)", ["job"], registry=r,
                                       multiprocess_mode="livemostrecent")
        self.ratelimit_rejections = Counter(
            "loraplex_ratelimit_rejections", "Requests refused (429) by a tenant's or key's "
            "limit", ["tenant", "limit"], registry=r)
        self.ratelimit_backend_errors = Counter(
            "loraplex_ratelimit_backend_errors",
            "Calls to the shared rate-limit counters (Redis) that failed", registry=r)
        self.engine_restarts = Counter("loraplex_engine_restarts",
                                       "Times the supervised engine was restarted", registry=r)

    def watch_adapter_tiers(self, source: str,
                            tiers: dict[str, Callable[[], dict[str, int]]],
                            slot_waiting: Callable[[], int]) -> None:
        """Report each tier's own counters (`stats` of Residency, DiskCache) and the requests
        waiting for an engine slot, at scrape time (the slots' owner only)."""
        self.residency.register(_AdapterTierCollector(source, tiers))
        self.residency.register(_FunctionGauge(
            "loraplex_adapter_slot_waiting", "Requests waiting for an engine adapter slot",
            slot_waiting))

    def watch_queue(self, queued: Callable[[], int]) -> None:
        self.live.register(_FunctionGauge(
            "loraplex_requests_queued", "Tenant API requests waiting for fair admission", queued))

    def watch_usage_meter(self, read: Callable[[], dict[str, int]]) -> None:
        """Report the usage meter's state at scrape time: `pending` entries not yet flushed,
        `failed_flushes` and `dropped_requests` (usage lost past its entry cap)."""
        self.live.register(_UsageMeterCollector(read))

    def exposition(self) -> bytes:
        """This process's scrape, less the `residency` part: the metrics of every gateway
        process of the unit (multiprocess mode) or of this one, then the `live` part."""
        standard = self.registry
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            standard = CollectorRegistry()
            MultiProcessCollector(standard, folder)  # type: ignore[no-untyped-call]
        return generate_latest(standard) + generate_latest(self.live)

    def residency_exposition(self) -> bytes:
        return generate_latest(self.residency)

    def pair(self, tenant: str, adapter: str) -> tuple[str, str]:
        """Labels for a (tenant, adapter) pair, collapsing pairs past the cap to 'other'."""
        key = (tenant, adapter)
        with self._lock:
            if key in self._pairs:
                return key
            if len(self._pairs) < self._max_pairs:
                self._pairs.add(key)
                return key
        return tenant, OTHER_LABEL


# Event counters each tier keeps, and the name they are reported under.
_TIER_EVENTS = {"hits": "hit", "loads": "load", "misses": "miss", "fetches": "load",
                "load_failures": "load_failure", "fetch_failures": "load_failure",
                "evictions": "eviction"}


class _AdapterTierCollector(Collector):
    def __init__(self, source: str, tiers: dict[str, Callable[[], dict[str, int]]]) -> None:
        self._source = source
        self._tiers = tiers

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "loraplex_adapter_cache_events",
            "Adapter cache events per tier (engine, disk) and source (local, s3)",
            labels=["tier", "event", "source"])
        resident = GaugeMetricFamily("loraplex_resident_adapters", "Adapters held per tier",
                                     labels=["tier"])
        for tier, read in self._tiers.items():
            stats = read()
            for field, event in _TIER_EVENTS.items():
                if field in stats:
                    events.add_metric([tier, event, self._source], stats[field])
            resident.add_metric([tier], stats.get("resident", stats.get("entries", 0)))
        yield events
        yield resident


class _FunctionGauge(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


class _UsageMeterCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        yield GaugeMetricFamily("loraplex_usage_pending_entries",
                                "Usage entries counted in memory, not yet in the registry",
                                value=state["pending"])
        yield CounterMetricFamily("loraplex_usage_failed_flushes",
                                  "Usage flushes to the registry that failed (kept, retried)",
                                  value=state["failed_flushes"])
        yield CounterMetricFamily("loraplex_usage_dropped_requests",
                                  "Requests whose usage was dropped (the meter's entry cap "
                                  "was reached while the registry could not be written)",
                                  value=state["dropped_requests"])
