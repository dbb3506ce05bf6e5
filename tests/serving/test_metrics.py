"""`GET /metrics`: parsed with prometheus_client's own parser, equal to the service counters, GPU gauges from
a fake NVML (the outermost boundary), and a real Prometheus (Debian's package) scraping it over loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.runtimes.fakes import fake_pynvml
from tests.serving.cp_harness import (
    ControlPlane,
    create,
    model_status,
    reach,
    register,
    running_plane,
    service,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cp(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_plane(serve_instance, example_models, tmp_path_factory.mktemp("metrics-home")) as plane:
        yield plane


@pytest.fixture(scope="module")
def svc(cp: ControlPlane, example_models: Path) -> dict[str, Any]:
    mid = register(cp.client, "metered", example_models / "mlp-onnx" / "1.0.0", "ONNX")
    model_status(cp.client, mid, "published")
    entry = {"model_id": mid, "weight": 100, "specification": "custom", "custom_spec": {"cpu": 0.25}}
    s = reach(cp.client, create(cp.client, "metered", [entry]), "running")
    for body, n in (({"instances": [[1, 2, 3, 4]]}, 9), ({"instances": [[1, 2]]}, 4)):
        for _ in range(n):
            httpx.post(s["access_address"], json=body, timeout=30)
    wait_for("13 calls counted", lambda: service(cp.client, s["service_id"])["invocation_times"] == 13, timeout_s=30)
    return s


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_equal_the_service_counters_and_state(cp: ControlPlane, svc: dict[str, Any]) -> None:
    r = cp.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.text)
    who = {"project": "default", "service": "metered"}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted((who | labels).items())))]

    detail = service(cp.client, svc["service_id"])
    version = {"model": "metered", "version": "1.0.0"}
    assert value("enginehouse_inference_requests_success_total", **version) == 9
    assert value("enginehouse_inference_requests_failure_total", **version) == 4
    assert detail["invocation_times"] == 13 and detail["failed_times"] == 4
    assert value("enginehouse_service_status", status="running") == 1
    assert value("enginehouse_service_status", status="failed") == 0
    assert value("enginehouse_service_replicas", state="running") == 1
    assert value("enginehouse_async_queue_depth", state="queued") == 0
    assert all(v == 1 for (name, _), v in samples.items() if name == "enginehouse_metrics_source_up")
    # histograms from the replicas, handed over with the counts: every call timed, every engine row seen
    assert value("enginehouse_request_duration_seconds_count", **version) == 13
    assert value("enginehouse_request_duration_seconds_bucket", le="+Inf", **version) == 13
    assert 0 < value("enginehouse_request_duration_seconds_sum", **version) < 13 * 5
    assert value("enginehouse_batch_size_sum", **version) == 9  # the 4 bad calls never reach the engine
    calls = value("enginehouse_compute_duration_seconds_count", **version)
    assert calls == value("enginehouse_batch_size_count", **version) and 1 <= calls <= 9
    assert value("enginehouse_queue_duration_seconds_count", **version) <= 9
    assert not any(name.startswith("enginehouse_gpu_") for name, _ in samples)  # no NVML here: no GPU series


def test_gpu_gauges_from_nvml(cp: ControlPlane, svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())  # two A30s at the NVML boundary
    samples = _samples(cp.client.get("/metrics").text)
    util = {
        dict(labels)["gpu"]: v for (name, labels), v in samples.items() if name == "enginehouse_gpu_utilization_ratio"
    }
    assert util == {"0": pytest.approx(0.37), "1": 0.0}
    power = [v for (name, _), v in samples.items() if name == "enginehouse_gpu_power_watts"]
    assert sorted(power) == [pytest.approx(31.0), pytest.approx(90.5)]
    total = [v for (name, _), v in samples.items() if name == "enginehouse_gpu_memory_total_bytes"]
    assert total == [24 * 2**30] * 2


def test_a_real_prometheus_scrapes_the_counter(cp: ControlPlane, svc: dict[str, Any], tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    port = free_port()
    target = cp.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: enginehouse, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    args = [
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        query = 'enginehouse_inference_requests_success_total{service="metered",version="1.0.0"}'

        def scraped() -> float | None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            except httpx.TransportError:
                return None
            result = r.json()["data"]["result"] if r.status_code == 200 else []
            return float(result[0]["value"][1]) if result else None

        assert wait_for("Prometheus to scrape the counter", scraped, timeout_s=60) == 9
        # every query of the shipped Grafana dashboard is valid PromQL over metrics the exposition has
        dashboard = json.loads((Path(__file__).resolve().parents[2] / "dashboards" / "enginehouse.json").read_text())
        exposed = cp.client.get("/metrics").text
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$project", ".*").replace("$service", ".*")
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=5)
                assert r.status_code == 200 and r.json()["status"] == "success", (panel["title"], r.text)
                for name in re.findall(r"enginehouse_[a-z_]+", expr):
                    family = re.sub(r"_(bucket|sum|count)$", "", name)
                    assert family in exposed or family.startswith("enginehouse_gpu_"), (panel["title"], name)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_failing_source_is_reported_and_the_rest_served(
    cp: ControlPlane, svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = fake_pynvml()

    def crash() -> int:
        raise RuntimeError("the NVML library crashed")  # not an NVMLError: the source itself fails

    broken.nvmlDeviceGetCount = crash  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    r = cp.client.get("/metrics")
    assert r.status_code == 200
    samples = _samples(r.text)
    up = {dict(labels)["source"]: v for (name, labels), v in samples.items() if name == "enginehouse_metrics_source_up"}
    assert up["nvml"] == 0 and up["registry"] == 1 and up["ray_serve"] == 1
    assert any(name == "enginehouse_inference_requests_success_total" for name, _ in samples)
