"""`enginehouse up` as a user runs it: a real process, embedded Ray, real HTTP, SIGTERM at the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference
from tests.conftest import free_port

pytestmark = pytest.mark.slow
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def _start_up(repo: Path, home: Path, port: int, data_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["ENGINEHOUSE_HOME"] = str(home)
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    args = [
        "up",
        "--port",
        str(port),
        "--data-port",
        str(data_port),
        "--model-repository",
        str(repo),
        "--num-cpus",
        "2",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _running_services(proc: subprocess.Popen[str], client: httpx.Client, port: int) -> dict[str, dict]:
    """Wait (bounded) until every example service is running; returns them by name."""
    deadline = time.monotonic() + 180
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            services = client.get(f"http://127.0.0.1:{port}/v1/default/services").json()["services"]
            last = {s["service_name"]: s["status"] for s in services}
            if last == {"echo-http": "running", "mlp-onnx": "running"}:
                return {s["service_name"]: s for s in services}
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"example services not running within 180 s: {last}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0


def test_up_serves_the_example_repository_and_restarts_intact(example_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(example_models / "mlp-onnx", repo / "mlp-onnx")
    shutil.copytree(REPO_MODELS / "echo-http", repo / "echo-http")
    port, data_port = free_port(), free_port()
    proc = _start_up(repo, tmp_path / "home", port, data_port)
    try:
        with httpx.Client(timeout=10) as client:
            services = _running_services(proc, client, port)
            onnx = services["mlp-onnx"]
            assert onnx["access_address"] == f"http://127.0.0.1:{data_port}/v1/infers/{onnx['service_id']}"
            r = client.post(onnx["access_address"], json={"instances": [[1, 2, 3, 4]]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                r.json()["predictions"], mlp_reference(np.array([[1, 2, 3, 4]], np.float32)), atol=1e-4
            )
            r = client.post(f"{services['echo-http']['access_address']}/a/b?k=v", content=b"\x00\x01raw")
            assert r.status_code == 200 and r.json()["path"] == "/a/b" and r.json()["query"] == "k=v"
            catalogue = client.get(f"http://127.0.0.1:{port}/v1/default/models/ai-engine-runtimes").json()
            assert catalogue["total_count"] >= 5
            models = client.get(f"http://127.0.0.1:{port}/v1/default/models").json()
            assert {m["model_name"]: m["model_status"] for m in models["models"]} == {
                "echo-http": "published",
                "mlp-onnx": "published",
            }
    finally:
        _stop(proc)

    # a restart (embedded Ray is new) restores the same services from the registry, not a second copy
    proc = _start_up(repo, tmp_path / "home", port, data_port)
    try:
        with httpx.Client(timeout=10) as client:
            again = _running_services(proc, client, port)
            assert {n: s["service_id"] for n, s in again.items()} == {n: s["service_id"] for n, s in services.items()}
            assert client.get(f"http://127.0.0.1:{port}/v1/default/models").json()["total_count"] == 2
            ev = client.get(f"http://127.0.0.1:{port}/v1/default/services/{onnx['service_id']}/events").json()
            assert [e["status"] for e in ev["events"]].count("running") == 2
            r = client.post(again["mlp-onnx"]["access_address"], json={"instances": [[1, 2, 3, 4]]})
            assert r.status_code == 200, r.text
    finally:
        _stop(proc)
    leftovers = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left behind: {leftovers}"
