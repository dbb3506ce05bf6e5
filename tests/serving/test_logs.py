"""Structured logs: JSON lines on request, each line of a management request with that request's id, and
never the token."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.controlplane.app import create_app
from serving.controlplane.auth import Authenticator
from serving.controlplane.manager import Manager
from serving.logs import setup_logging
from serving.registry import open_registry


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    setup_logging("json", stream=out)
    yield out
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_management_request_logs_json_with_its_request_id_and_no_token(
    json_logs: io.StringIO, tmp_path: Path
) -> None:
    registry = open_registry(None, tmp_path)
    sid = registry.add_service("default", service_name="s", config=[])
    app = create_app(
        Manager(registry=registry, data_address="http://x", roots=[tmp_path]),
        Authenticator(registry, {"t0k3n-secret": "default"}),
    )
    client = TestClient(app)
    r = client.delete(f"/v1/default/services/{sid}", headers={"X-Auth-Token": "t0k3n-secret", "X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    r = client.delete(
        f"/v1/default/services/{sid}", headers={"X-Auth-Token": "t0k3n-secret", "X-Request-ID": "bad id\n{"}
    )
    assert r.headers["x-request-id"] != "bad id\n{" and len(r.headers["x-request-id"]) == 32  # made up instead
    err = json_logs.getvalue()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    deleting = [line for line in lines if line["message"] == f"service {sid} deleting"]
    assert deleting and deleting[0]["request_id"] == "req-42" and deleting[0]["level"] == "INFO"
    assert {"time", "level", "logger", "message"} <= set(deleting[0])
    assert "t0k3n-secret" not in err
    registry.close()
