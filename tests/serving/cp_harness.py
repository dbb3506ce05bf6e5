"""A control plane run in-process on the session's Ray, over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
