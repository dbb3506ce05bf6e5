"""Tokens on the data plane: the replicas check them (hashes only reach them), live as tokens change."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.registry import open_registry
from tests.serving.cp_harness import (
    ControlPlane,
    cp_settings,
    create,
    model_status,
    reach,
    register,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.slow
BODY = {"instances": [[1, 2, 3, 4]]}


@pytest.fixture(scope="module")
def locked(
    serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, dict[str, Any], Path]]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("dp-auth-home")
    settings = cp_settings(serve_instance, example_models, home, auth_tokens="default:tok-default,other:tok-other")
    registry = open_registry(None, home)
    cp = start_control_plane(settings, registry)
    cp.client.headers["X-Auth-Token"] = "tok-default"
    mid = register(cp.client, "guarded", example_models / "mlp-onnx" / "1.0.0", "ONNX")
    model_status(cp.client, mid, "published")
    sid = create(
        cp.client,
        "guarded",
        [{"model_id": mid, "weight": 100, "specification": "custom", "custom_spec": {"cpu": 0.25}}],
    )
    yield cp, reach(cp.client, sid, "running"), home
    cp.stop()
    deploy.sync({})
    registry.close()


def test_the_replica_checks_the_token_and_counts_refusals(locked: tuple[ControlPlane, dict[str, Any], Path]) -> None:
    cp, svc, _ = locked
    url = svc["access_address"]
    r = httpx.post(url, json=BODY, timeout=30)
    assert r.status_code == 401 and "token" in r.json()["error"]
    r = httpx.post(url, json=BODY, headers={"X-Auth-Token": "nope"}, timeout=30)
    assert r.status_code == 401 and "unknown token" in r.json()["error"]
    r = httpx.post(url, json=BODY, headers={"X-Auth-Token": "tok-other"}, timeout=30)
    assert r.status_code == 403 and "project other" in r.json()["error"]
    assert httpx.post(url, json=BODY, headers={"X-Auth-Token": "tok-default"}, timeout=30).status_code == 200
    assert httpx.post(url, json=BODY, headers={"Authorization": "OAuth tok-default"}, timeout=30).status_code == 200
    assert httpx.get(f"{url}/v2/health/ready", timeout=30).status_code == 200  # probes need no token

    def counted() -> bool:
        s = cp.client.get(f"/v1/default/services/{svc['service_id']}").json()
        return (s["invocation_times"], s["failed_times"]) == (5, 3)

    wait_for("5 calls, 3 refused", counted, timeout_s=30)


def test_a_token_created_while_running_opens_the_data_plane(locked: tuple[ControlPlane, dict[str, Any], Path]) -> None:
    _, svc, home = locked
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "token", "create", "--project", "default"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ENGINEHOUSE_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    wait_for(
        "the new token accepted by the replica",
        lambda: (
            httpx.post(svc["access_address"], json=BODY, headers={"X-Auth-Token": token}, timeout=30).status_code == 200
        ),
        timeout_s=30,
    )
