"""Async request mode on a real Ray Serve: accepted requests are durable, survive a killed replica and a
restarted control plane, and each one's result is written exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference
from serving.registry import Registry, open_registry
from serving.settings import Settings
from tests.conftest import free_port
from tests.serving.cp_harness import (
    ControlPlane,
    async_results,
    cp_settings,
    create,
    model_status,
    reach,
    register,
    service,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.slow
P = "default"


@dataclass
class Env:
    cp: ControlPlane
    settings: Settings
    registry: Registry
    svc: dict[str, Any]


def _settings(serve_instance: str, example_models: Path, home: Path, **kw: Any) -> Settings:
    return cp_settings(serve_instance, example_models, home, **kw)


def _deploy(cp: ControlPlane, example_models: Path, name: str) -> dict[str, Any]:
    mid = register(cp.client, name, example_models / "mlp-onnx" / "1.0.0", "ONNX")
    model_status(cp.client, mid, "published")
    entry = {
        "model_id": mid,
        "weight": 100,
        "specification": "custom",
        "custom_spec": {"cpu": 0.25},
        # a claim held by a killed replica is taken over after this lease
        "envs": {"ENGINEHOUSE_ASYNC_LEASE_S": "2"},
    }
    return reach(cp.client, create(cp.client, name, [entry]), "running")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's package; .ci/run installs it) on a loopback port, persisting to AOF."""
    from serving.dataplane.asyncq_redis import wait_ready

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes", "--save", ""]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_ready(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["database", "redis"])
def env(
    request: pytest.FixtureRequest, serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("async-home")
    store = {"async_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    settings = _settings(serve_instance, example_models, home, **store)
    registry = open_registry(None, home)
    cp = start_control_plane(settings, registry)
    e = Env(cp, settings, registry, _deploy(cp, example_models, f"asy-{request.param}"))
    yield e
    e.cp.stop()
    deploy.sync({})
    registry.close()


def _x(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32)


def _body(i: int) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": _x(i).ravel().tolist()}],
    }


def _check(done: dict[int, dict[str, Any]]) -> None:
    for i, res in done.items():
        assert res["status"] == "succeeded", res
        out = res["result"]
        assert out["id"] == f"r{i}"  # each result is its own request's
        np.testing.assert_allclose(np.asarray(out["outputs"][0]["data"]).reshape(1, 3), mlp_reference(_x(i)), atol=1e-4)


def test_async_accepts_runs_and_counts_each_request_once(env: Env) -> None:
    url = env.svc["access_address"]
    before = service(env.cp.client, env.svc["service_id"])
    with httpx.Client(timeout=30) as c:
        accepted = {}
        for i in range(30):
            r = c.post(f"{url}/async", json=_body(i))
            assert r.status_code == 202 and r.json()["status"] == "queued", r.text
            accepted[i] = r.json()["request_id"]
        bad = c.post(
            f"{url}/async", json={"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1] * 5}]}
        )
        assert bad.status_code == 400 and "shape" in bad.json()["error"]  # refused before any 202
        assert c.get(f"{url}/async/no-such-request").status_code == 404
        depth = c.get(f"{url}/async").json()
        assert set(depth) == {"queued", "running"}
    _check(async_results(url, accepted))

    def counted() -> bool:
        s = service(env.cp.client, env.svc["service_id"])
        return (s["invocation_times"] - before["invocation_times"], s["failed_times"] - before["failed_times"]) == (
            31,
            1,
        )

    wait_for("31 calls counted, 1 failed", counted, timeout_s=30)
    assert service(env.cp.client, env.svc["service_id"])["async_queue"] == {"queued": 0, "running": 0}


def _replica_pids(service_id: str) -> list[int]:
    from ray._private import state

    prefix = f"SERVE_REPLICA::{service_id}#"
    return [
        int(a["Pid"])
        for a in state.actors().values()
        if (a.get("Name") or "").startswith(prefix) and a["State"] == "ALIVE"
    ]


def test_accepted_requests_survive_a_killed_replica_and_a_control_plane_restart(env: Env) -> None:
    url = env.svc["access_address"]
    env.cp.stop()  # the control plane is down while requests are accepted: the data plane does not need it
    accepted: dict[int, str] = {}

    def post(i: int) -> None:
        try:
            r = httpx.post(f"{url}/async", json=_body(i), timeout=30)
        except httpx.TransportError:
            return  # not accepted: the client knows it
        if r.status_code == 202:
            accepted[i] = r.json()["request_id"]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, range(100, 220)))
        pids = _replica_pids(env.svc["service_id"])
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        list(pool.map(post, range(220, 260)))
    assert len(accepted) >= 100, len(accepted)
    env.cp = start_control_plane(env.settings, env.registry)
    reach(env.cp.client, env.svc["service_id"], "running", timeout_s=120)
    time.sleep(0.5)
    _check(async_results(url, accepted, timeout_s=180))
    # each accepted request ran to one committed result: none is left queued or running
    assert service(env.cp.client, env.svc["service_id"])["async_queue"] == {"queued": 0, "running": 0}
