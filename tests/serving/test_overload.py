"""Overload, over real HTTP on the session's Ray Serve: a bounded queue answers 503 with Retry-After, a
per-request timeout answers 504 and frees the engine slot, and a client that goes away leaves the queue.

The services batch with a long wait (``batch_timeout_ms``), so requests are held in the replica for a known
time without any sleep in the model: what is held, refused, timed out or cancelled is then exact.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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

P = "default"
GOOD = {"instances": [[0.1, 0.2, 0.3, 0.4]]}


@pytest.fixture(scope="module")
def cp(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_plane(serve_instance, example_models, tmp_path_factory.mktemp("overload-home")) as plane:
        yield plane


@pytest.fixture(scope="module")
def services(cp: ControlPlane, example_models: Path) -> dict[str, dict[str, Any]]:
    mid = register(cp.client, "mlp", example_models / "mlp-onnx" / "1.0.0", "ONNX")
    model_status(cp.client, mid, "published")
    entry = {"model_id": mid, "weight": 100, "specification": "custom", "custom_spec": {"cpu": 0.25}}
    held = create(cp.client, "held", [entry | {"max_batch_size": 64, "batch_timeout_ms": 2000, "max_queue_size": 4}])
    slow = create(
        cp.client,
        "slow",
        [entry | {"max_batch_size": 64, "batch_timeout_ms": 3000, "request_timeout_s": 0.5}],
    )
    return {name: reach(cp.client, sid, "running") for name, sid in (("held", held), ("slow", slow))}


def _executions(s: dict[str, Any]) -> int:
    stats = httpx.get(f"{s['access_address']}/v2/models/{s['service_name']}/stats", timeout=10).json()
    return int(stats["model_stats"][0]["inference_count"])


def _post(address: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(address, json=GOOD, timeout=timeout)


def test_past_the_queue_bound_requests_get_503_with_retry_after_at_once(
    cp: ControlPlane, services: dict[str, dict[str, Any]]
) -> None:
    s = services["held"]
    before = service(cp.client, s["service_id"])
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        started = time.monotonic()
        futures = [pool.submit(lambda: (_post(s["access_address"]), time.monotonic() - started)) for _ in range(10)]
        answers = [f.result() for f in futures]
    ok = [(r, t) for r, t in answers if r.status_code == 200]
    refused = [(r, t) for r, t in answers if r.status_code == 503]
    assert len(ok) == 4 and len(refused) == 6, [r.status_code for r, _ in answers]
    for r, took in refused:
        assert r.headers["retry-after"] == "1" and "max_queue_size 4" in r.json()["error"]
        assert took < 1.5, took  # refused at once, not after the 2 s the held ones wait
    assert all(took >= 1.5 for _, took in ok)  # the held four waited for their batch and were answered
    wait_for(
        "10 calls counted, 6 failed",
        lambda: (
            (now := service(cp.client, s["service_id"]))["invocation_times"] - before["invocation_times"] == 10
            and now["failed_times"] - before["failed_times"] == 6
        ),
        timeout_s=30,
    )


def test_a_request_past_its_timeout_gets_504_and_never_reaches_the_engine(
    cp: ControlPlane, services: dict[str, dict[str, Any]]
) -> None:
    s = services["slow"]
    ran = _executions(s)
    started = time.monotonic()
    r = _post(s["access_address"])
    took = time.monotonic() - started
    assert r.status_code == 504 and "request_timeout_s 0.5" in r.json()["error"], r.text
    assert 0.4 < took < 2.0, took
    time.sleep(3.5)  # past the batch wait: a request still queued would have run by now
    assert _executions(s) == ran  # it left the queue when it timed out


def test_a_client_that_goes_away_leaves_the_queue(cp: ControlPlane, services: dict[str, dict[str, Any]]) -> None:
    s = services["held"]
    ran = _executions(s)
    before = service(cp.client, s["service_id"])
    # a client that sends its request and closes the connection while the request is held (a raw socket:
    # httpx closes a timed-out connection only when it is collected)
    url = httpx.URL(s["access_address"])
    body = b'{"instances": [[0.1, 0.2, 0.3, 0.4]]}'
    with socket.create_connection((url.host, url.port)) as sock:
        head = f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    time.sleep(2.5)  # past the 2 s batch wait
    assert _executions(s) == ran
    wait_for(
        "the abandoned call counted as failed",
        lambda: service(cp.client, s["service_id"])["failed_times"] - before["failed_times"] == 1,
        timeout_s=30,
    )
    assert _post(s["access_address"]).status_code == 200  # and the queue is free again
