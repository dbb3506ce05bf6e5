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


def test_up_serves_the_example_repository(example_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(example_models / "mlp-onnx", repo / "mlp-onnx")
    shutil.copytree(REPO_MODELS / "echo-http", repo / "echo-http")
    port, data_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["ENGINEHOUSE_HOME"] = str(tmp_path / "home")
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "up",
            "--port",
            str(port),
            "--data-port",
            str(data_port),
            "--model-repository",
            str(repo),
            "--num-cpus",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            else:
                pytest.fail("control plane did not come up within 120 s")
            services = client.get(f"http://127.0.0.1:{port}/v1/default/services").json()["services"]
            assert {s["service_id"]: s["status"] for s in services} == {"echo-http": "running", "mlp-onnx": "running"}
            onnx = next(s for s in services if s["service_id"] == "mlp-onnx")
            r = client.post(onnx["access_address"], json={"instances": [[1, 2, 3, 4]]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                r.json()["predictions"], mlp_reference(np.array([[1, 2, 3, 4]], np.float32)), atol=1e-4
            )
            r = client.post(f"http://127.0.0.1:{data_port}/v1/infers/echo-http/a/b?k=v", content=b"\x00\x01raw")
            assert r.status_code == 200 and r.json()["path"] == "/a/b" and r.json()["query"] == "k=v"
            catalogue = client.get(f"http://127.0.0.1:{port}/v1/default/models/ai-engine-runtimes").json()
            assert catalogue["total_count"] >= 5
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    leftovers = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left behind: {leftovers}"
