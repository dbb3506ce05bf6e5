"""``GET /metrics``: Prometheus text exposition, built at scrape time from the sources of truth.

The request counters are the registry's exact counters (the same numbers as a service's
``invocation_times``/``failed_times``, so they survive restarts); service status, replica counts and async
queue depth come from the registry, Ray Serve and the queue; GPUs from NVML, NPUs from the plugins. Nothing
is gathered on the request path. A source that fails is reported by ``enginehouse_metrics_source_up`` and
the scrape still answers with everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.controlplane.manager import Manager
from serving.controlplane.schemas import ServiceStatus

log = logging.getLogger("enginehouse.metrics")

SERVICE_LABELS = ["project", "service"]
REQUEST_LABELS = [*SERVICE_LABELS, "model", "version"]
STATUSES: tuple[str, ...] = ServiceStatus.__args__  # type: ignore[attr-defined]


class EnginehouseCollector(Collector):
    """Every Enginehouse metric, declared here once with its fixed label set."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

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
        for row in rows:
            labels = [row.project_id, row.service_name]
            models = {e["model_version"]: e["model_name"] for e in row.config}
            for version, (inv, failed) in reg.get_counts(row.service_id).items():
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


def exposition(manager: Manager) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EnginehouseCollector(manager))
    return generate_latest(registry)
