"""``GET /metrics``: Prometheus text exposition, built at scrape time from the sources of truth.

The request counters are the registry's exact counters (the same numbers as a service's
``invocation_times``/``failed_times``, so they survive restarts); service status, replica counts and async
queue depth come from the registry, Ray Serve and the queue; GPUs from NVML, NPUs from the plugins. Nothing
is gathered on the request path. A source that fails is reported by ``enginehouse_metrics_source_up`` and
the scrape still answers with everything else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.controlplane.manager import Manager
from serving.controlplane.schemas import ServiceStatus
from serving.dataplane.counters import BUCKETS, Hists

log = logging.getLogger("enginehouse.metrics")

SERVICE_LABELS = ["project", "service"]
REQUEST_LABELS = [*SERVICE_LABELS, "model", "version"]
STATUSES: tuple[str, ...] = ServiceStatus.__args__  # type: ignore[attr-defined]


HISTOGRAMS = {
    "request": ("enginehouse_request_duration_seconds", "Time from a request's arrival at the replica to its answer"),
    "queue": ("enginehouse_queue_duration_seconds", "Time a request waited in its version's batch queue"),
    "compute": ("enginehouse_compute_duration_seconds", "Time of one engine call (one batch)"),
    "batch": ("enginehouse_batch_size", "Rows per engine call"),
}


class Histograms:
    """The replicas' histograms, merged as their count batches are committed (so each observation once).

    Kept in memory: after a control-plane restart they start again from zero, which Prometheus reads as a
    counter reset; the request counters themselves live in the registry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str, str], tuple[list[int], float]] = {}

    def add(self, service_id: str, hists: Hists) -> None:
        """Merge one committed batch's histograms."""
        with self._lock:
            for version, kinds in hists.items():
                for kind, (counts, total) in kinds.items():
                    key = (service_id, version, kind)
                    old, old_sum = self._data.get(key) or ([0] * len(counts), 0.0)
                    self._data[key] = ([a + b for a, b in zip(old, counts, strict=True)], old_sum + total)

    def snapshot(self) -> dict[tuple[str, str, str], tuple[list[int], float]]:
        """A copy to expose."""
        with self._lock:
            return {k: (list(c), s) for k, (c, s) in self._data.items()}


class EnginehouseCollector(Collector):
    """Every Enginehouse metric, declared here once with its fixed label set."""

    def __init__(self, manager: Manager, histograms: Histograms | None = None) -> None:
        self.manager = manager
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        """One scrape."""
        up = GaugeMetricFamily(
            "enginehouse_metrics_source_up",
            "1 when the source answered this scrape, 0 when it failed",
            labels=["source"],
        )
        yield from self._services(up)
        yield from self._accelerators(up)
        yield up

    def _try(self, up: GaugeMetricFamily, source: str, fn: Callable[[], Any], default: Any) -> Any:
        try:
            value = fn()
        except Exception:  # one missing source never fails the scrape
            log.exception("metrics source %s failed", source)
            up.add_metric([source], 0)
            return default
        up.add_metric([source], 1)
        return value

    def _services(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        from serving.dataplane import deploy

        reg = self.manager.registry
        success = CounterMetricFamily(
            "enginehouse_inference_requests_success",
            "Calls that reached the service and succeeded",
            labels=REQUEST_LABELS,
        )
        failure = CounterMetricFamily(
            "enginehouse_inference_requests_failure", "Calls that reached the service and failed", labels=REQUEST_LABELS
        )
        status = GaugeMetricFamily(
            "enginehouse_service_status", "1 for the service's current status", labels=[*SERVICE_LABELS, "status"]
        )
        replicas = GaugeMetricFamily(
            "enginehouse_service_replicas", "Replicas by state (running, other)", labels=[*SERVICE_LABELS, "state"]
        )
        depth = GaugeMetricFamily(
            "enginehouse_async_queue_depth", "Async requests waiting or running", labels=[*SERVICE_LABELS, "state"]
        )
        _, rows = self._try(up, "registry", lambda: reg.list_services(None, limit=1_000_000), (0, []))
        apps = self._try(up, "ray_serve", deploy.app_states, {})
        queue = self.manager.queue
        counts_of = self._try(up, "counters", reg.all_counts, {})
        for row in rows:
            labels = [row.project_id, row.service_name]
            models = {e["model_version"]: e["model_name"] for e in row.config}
            for version, (inv, failed) in counts_of.get(row.service_id, {}).items():
                success.add_metric([*labels, models.get(version, ""), version], inv - failed)
                failure.add_metric([*labels, models.get(version, ""), version], failed)
            for s in STATUSES:
                status.add_metric([*labels, s], 1.0 if row.status == s else 0.0)
            app = apps.get(row.service_id)
            states = app.replica_states if app else {}
            running = states.get("RUNNING", 0)
            replicas.add_metric([*labels, "running"], running)
            replicas.add_metric([*labels, "other"], sum(states.values()) - running)
            if queue is not None and row.infer_type == "real-time":
                source, sid = f"async_queue:{row.service_name}", row.service_id
                counts: dict[str, int] = self._try(up, source, lambda: queue.depth(sid), {})  # noqa: B023
                for state, n in counts.items():
                    depth.add_metric([*labels, state], n)
        yield from (success, failure, status, replicas, depth)
        yield from self._histograms(rows)

    def _histograms(self, rows: list[Any]) -> Iterator[Metric]:
        families = {
            kind: HistogramMetricFamily(name, doc, labels=REQUEST_LABELS) for kind, (name, doc) in HISTOGRAMS.items()
        }
        services = {row.service_id: row for row in rows}
        for (sid, version, kind), (counts, total) in (self.histograms.snapshot() if self.histograms else {}).items():
            row = services.get(sid)
            if row is None:
                continue  # deleted since
            models = {e["model_version"]: e["model_name"] for e in row.config}
            bounds = BUCKETS[kind]
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            labels = [row.project_id, row.service_name, models.get(version, ""), version]
            families[kind].add_metric(labels, buckets, sum_value=total)
        yield from families.values()

    def _accelerators(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        from runtimes.accelerators import detect_gpus, detect_npus

        gpu = ["gpu", "name", "uuid"]
        util = GaugeMetricFamily("enginehouse_gpu_utilization_ratio", "GPU utilisation, 0-1 (NVML)", labels=gpu)
        used = GaugeMetricFamily("enginehouse_gpu_memory_used_bytes", "GPU memory used (NVML)", labels=gpu)
        total = GaugeMetricFamily("enginehouse_gpu_memory_total_bytes", "GPU memory (NVML)", labels=gpu)
        power = GaugeMetricFamily("enginehouse_gpu_power_watts", "GPU power draw (NVML)", labels=gpu)
        for g in self._try(up, "nvml", detect_gpus, []):
            labels = [str(g.index), g.name, g.uuid or ""]
            for family, value in (
                (util, g.utilization),
                (used, g.memory_used),
                (total, g.memory_total),
                (power, g.power),
            ):
                if value is not None:  # a field this board does not report is left out, not zero
                    family.add_metric(labels, value / 100 if family is util else value)
        npu = ["npu", "name", "resource"]
        n_util = GaugeMetricFamily("enginehouse_npu_utilization_ratio", "NPU utilisation, 0-1 (plugin)", labels=npu)
        n_used = GaugeMetricFamily("enginehouse_npu_memory_used_bytes", "NPU memory used (plugin)", labels=npu)
        n_total = GaugeMetricFamily("enginehouse_npu_memory_total_bytes", "NPU memory (plugin)", labels=npu)
        for d in self._try(up, "npu_plugins", detect_npus, []):
            labels = [str(d.index), d.name, d.resource_name]
            for family, value in ((n_util, d.utilization), (n_used, d.memory_used), (n_total, d.memory_total)):
                if value is not None:
                    family.add_metric(labels, value / 100 if family is n_util else value)
        yield from (f for f in (util, used, total, power, n_util, n_used, n_total) if f.samples)


def exposition(manager: Manager, histograms: Histograms | None = None) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EnginehouseCollector(manager, histograms))
    return generate_latest(registry)
