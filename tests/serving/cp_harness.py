"""A control plane run in-process on the session's Ray, over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from serving.controlplane.manager import Manager
from serving.launcher import control_plane
from serving.registry import Registry
from serving.settings import Settings
from tests.conftest import free_port


@dataclass
class ControlPlane:
    """A running control plane: its base URL, client, manager and how to stop it."""

    url: str
    client: httpx.Client
    manager: Manager
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Stop serving and the reconciler (the lifespan's end), leaving Ray Serve as it is."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.close()


def cp_settings(serve_url: str, example_models: Path, home: Path, *roots: Path, **extra: Any) -> Settings:
    """Settings of a test control plane on the session's Serve: its own home, the examples and ``roots``
    allowed as model sources, a fast reconcile loop."""
    return Settings(
        home=home,
        data_port=int(serve_url.rsplit(":", 1)[1]),
        model_repository=example_models,
        allowed_roots=os.pathsep.join(str(r) for r in (example_models, *roots)),
        reconcile_interval_s=0.5,
        **extra,
    )


def start_control_plane(settings: Settings, registry: Registry, reconcile: bool = True, **kwargs: Any) -> ControlPlane:
    """Start the control-plane app on a free loopback port in a thread and wait until it answers.

    ``reconcile=False`` skips the app's lifespan (no reconciler, no background validation): for tests of the
    API alone beside another control plane, since this process has one Ray Serve application set.
    """
    app, manager = control_plane(settings, registry, **kwargs)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on" if reconcile else "off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="control-plane", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "control plane did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    return ControlPlane(url, httpx.Client(base_url=url, timeout=60), manager, server, thread)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90.0, every_s: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")


def register(
    c: httpx.Client, name: str, source: Path, model_type: str, version: str = "1.0.0", project: str = "default"
) -> str:
    """Register a model version; returns its id."""
    r = c.post(
        f"/v1/{project}/models",
        json={"model_name": name, "model_version": version, "model_type": model_type, "source_location": str(source)},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["model_id"])


def model_status(c: httpx.Client, model_id: str, wanted: str, project: str = "default") -> dict[str, Any]:
    """Wait until the model reaches ``wanted``."""

    def check() -> dict[str, Any] | None:
        m = c.get(f"/v1/{project}/models/{model_id}").json()
        return m if m["model_status"] == wanted else None

    return dict(wait_for(f"model {model_id} {wanted}", check, timeout_s=120))


def service(c: httpx.Client, sid: str, project: str = "default") -> dict[str, Any]:
    """The service detail."""
    r = c.get(f"/v1/{project}/services/{sid}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def reach(c: httpx.Client, sid: str, wanted: str, timeout_s: float = 120, project: str = "default") -> dict[str, Any]:
    """Wait until the service reaches ``wanted``; fail at once if it fails instead."""
    seen: list[str] = []

    def check() -> dict[str, Any] | None:
        s = service(c, sid, project)
        if not seen or seen[-1] != s["status"]:
            seen.append(s["status"])
        if s["status"] == "failed" and wanted != "failed":
            raise AssertionError(f"service failed: {s.get('error_msg')}")
        return s if s["status"] == wanted else None

    return dict(wait_for(f"service {sid} {wanted} (seen {seen})", check, timeout_s=timeout_s))


def create(c: httpx.Client, name: str, config: list[dict[str, Any]], project: str = "default", **extra: Any) -> str:
    """Create a service; returns its id."""
    r = c.post(f"/v1/{project}/services", json={"service_name": name, "config": config, **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["service_id"])


def events(c: httpx.Client, sid: str, project: str = "default") -> list[dict[str, Any]]:
    """The service's events, oldest first."""
    return list(c.get(f"/v1/{project}/services/{sid}/events").json()["events"])


def settled_counts(c: httpx.Client, sid: str, project: str = "default", quiet_s: float = 2.0) -> tuple[int, int]:
    """``(invocation_times, failed_times)`` once they stop moving: calls made just before are counted by now
    (replicas hand counts over every 0.5 s, the control plane commits them on its next tick)."""
    last: tuple[int, int] | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = service(c, sid, project)
        now = (int(s["invocation_times"]), int(s["failed_times"]))
        if now == last:
            return now
        last = now
        time.sleep(quiet_s)
    raise AssertionError(f"the counters of {sid} kept moving for 60 s; last {last}")


@contextmanager
def running_plane(
    serve_url: str, example_models: Path, home: Path, *roots: Path, **extra: Any
) -> Iterator[ControlPlane]:
    """A control plane with its own registry under ``home`` for a test module; on exit it stops and leaves the
    session's Serve without applications."""
    from serving.dataplane import deploy
    from serving.registry import open_registry

    registry = open_registry(None, home)
    plane = start_control_plane(cp_settings(serve_url, example_models, home, *roots, **extra), registry)
    try:
        yield plane
    finally:
        plane.stop()
        deploy.sync({})
        registry.close()


def async_results(url: str, accepted: dict[int, str], timeout_s: float = 120) -> dict[int, dict[str, Any]]:
    """Poll every accepted async request at ``url`` (an access address) until each has finished; a replica or
    ingress that is coming back (a transport error, a 5xx) is waited for, any other answer must be 200."""
    done: dict[int, dict[str, Any]] = {}

    def all_done() -> bool:
        with httpx.Client(timeout=30) as c:
            for i, rid in accepted.items():
                if i in done:
                    continue
                try:
                    r = c.get(f"{url}/async/{rid}")
                except httpx.TransportError:
                    return False
                if r.status_code >= 500:
                    return False
                assert r.status_code == 200, f"request {i} ({rid}): {r.status_code} {r.text}"
                if r.json()["status"] in ("succeeded", "failed"):
                    done[i] = r.json()
        return len(done) == len(accepted)

    wait_for(f"{len(accepted)} async results", all_done, timeout_s=timeout_s, every_s=0.5)
    return done
