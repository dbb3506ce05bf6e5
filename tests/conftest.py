"""Shared fixtures: one Ray instance (with Ray Serve) per test session, example models built by code."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep every Ray port on loopback and use the measured-fastest ingress, before Ray is imported anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
# A removed direct-ingress replica drains 30 s by default so outside load balancers can stop sending; on
# loopback HAProxy is reloaded at once, and tests remove many applications.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_instance() -> Iterator[str]:
    """Ray + Ray Serve started once for the whole session; yields the data-plane base URL."""
    import ray
    from ray import serve

    # HAProxy mode's stats and metrics frontends have fixed default ports: move them so a second Serve
    # (a user's `enginehouse up`, or the one test_up starts) can run beside this one
    os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    # ray.shutdown() stops Serve's actors with the cluster; serve.shutdown() first would wait 30 s for
    # the HAProxy-mode controller here
    ray.shutdown()


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model repository, built once by code into a temporary folder."""
    from models.build import ensure_examples

    root = tmp_path_factory.mktemp("models")
    ensure_examples(root, text=False)  # the MiniLM export has its own fixtures (tests/runtimes/test_text.py)
    return root
