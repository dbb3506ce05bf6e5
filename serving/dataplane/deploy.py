"""Services onto Ray Serve through its declarative config API, so live changes stay live.

Applications deployed with ``serve.run`` get a new code version on every call, so even a weight change
would replace every replica (and each replaced direct-ingress replica drains for 30 s). Deployed from a
config with a fixed import path, a change of ``user_config`` alone is a lightweight update: Ray Serve calls
``reconfigure`` on the running replicas. The config API takes the full set of applications at once, so
this module keeps the desired set of this process and always submits all of it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.schema import ServeDeploySchema

#: overload defaults of a service's replicas (per config entry: ``max_queue_size``, ``request_timeout_s``)
DEFAULT_MAX_QUEUE = 256
DEFAULT_TIMEOUT_S = 30.0
BUILDER = "serving.dataplane.replica:app_builder"
_lock = threading.Lock()
_apps: dict[str, dict[str, Any]] = {}


def _log_encoding() -> str:
    """Serve's log encoding for our applications: JSON when Enginehouse logs JSON."""
    return "JSON" if os.environ.get("ENGINEHOUSE_LOG_FORMAT") == "json" else "TEXT"


def service_app(
    service: str,
    versions: list[dict[str, Any]],
    num_cpus: float,
    num_replicas: int = 1,
    num_gpus: float = 0.0,
    route_prefix: str | None = None,
    *,
    memory_mb: int | None = None,
    resources: dict[str, float] | None = None,
    env_vars: dict[str, str] | None = None,
    max_replicas: int | None = None,
    service_name: str | None = None,
    auth: dict[str, Any] | None = None,
    async_queue: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Serve application config of one service; weights live only in ``user_config``.

    ``max_replicas`` above ``num_replicas`` turns on Ray Serve autoscaling between the two.
    ``auth`` (``{"project", "tokens": {sha256: project}}``) makes the replicas check ``X-Auth-Token``.
    """
    static = [{k: v for k, v in ver.items() if k != "weight"} for ver in versions]
    actor_options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if memory_mb:
        actor_options["memory"] = memory_mb * 1024 * 1024
    if resources:
        actor_options["resources"] = resources
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": env_vars}
    deployment: dict[str, Any] = {
        "name": "replica",
        "user_config": {
            "weights": {v["version"]: int(v.get("weight", 100)) for v in versions},
            # {"project", "tokens": {sha256: project}}; None while auth is off. Live, like the weights.
            "auth": auth,
        },
    }
    if max_replicas and max_replicas > num_replicas:
        deployment["autoscaling_config"] = {
            "min_replicas": num_replicas,
            "max_replicas": max_replicas,
            # a batching replica is efficient with many requests in flight
            "target_ongoing_requests": 16,
        }
    else:
        deployment["num_replicas"] = num_replicas
    return {
        "name": service,
        "route_prefix": route_prefix or f"/v1/infers/{service}",
        "import_path": BUILDER,
        "args": {
            "service": service,
            "service_name": service_name or service,
            "versions": static,
            "actor_options": actor_options,
            "async_queue": async_queue,
        },
        "deployments": [deployment],
        # one log line per request costs the replica's event loop about 4 % (py-spy, benchmarks/README.md);
        # the counters and the service events say what a per-request log would
        "logging_config": {"enable_access_log": False, "encoding": _log_encoding()},
    }


def _submit() -> None:
    client = serve.context._get_global_client()
    if client is None:
        raise RuntimeError("Ray Serve is not started: call serve.start() first")
    client.deploy_apps(ServeDeploySchema(applications=list(_apps.values())), _blocking=False)


def put(app: dict[str, Any]) -> None:
    """Create or update one application (the others are resubmitted unchanged)."""
    with _lock:
        _apps[app["name"]] = app
        _submit()


def sync(apps: dict[str, dict[str, Any]]) -> bool:
    """Make the desired set exactly ``apps``; submits only when it changed. Returns True when it submitted."""
    with _lock:
        if apps == _apps:
            return False
        _apps.clear()
        _apps.update(apps)
        _submit()
        return True


def remove(name: str) -> None:
    """Delete one application."""
    with _lock:
        if _apps.pop(name, None) is not None:
            _submit()


@dataclass(frozen=True)
class AppState:
    """What the reconciler reads of one application: Serve's status and its ``replica`` deployment's."""

    status: str  # DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, ...
    message: str
    last_deployed_time_s: float
    replica_states: dict[str, int]  # RUNNING, STARTING, ... -> count
    target_replicas: int | None


def _name(value: Any) -> str:
    """Serve's enum members (``ApplicationStatus.RUNNING``) as their plain value (``RUNNING``)."""
    return str(getattr(value, "value", value))


def app_states() -> dict[str, AppState]:
    """Every application's state from the controller's raw details.

    ``serve.status()`` builds pydantic models of the whole Serve config first, cloudpickling each deployment's
    request router on the way: 10 % of a core for a 1 s reconcile loop over five services. The raw details
    carry the same facts.
    """
    client = serve.context._get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    out: dict[str, AppState] = {}
    for name, app in (client.get_serve_details().get("applications") or {}).items():
        dep = (app.get("deployments") or {}).get("replica") or {}
        states: dict[str, int] = {}
        for replica in dep.get("replicas") or []:
            state = _name(replica.get("state"))
            states[state] = states.get(state, 0) + 1
        out[name] = AppState(
            status=_name(app.get("status")),
            message=(dep.get("message") or "") or str(app.get("message") or ""),
            last_deployed_time_s=float(app.get("last_deployed_time_s") or 0.0),
            replica_states=states,
            target_replicas=dep.get("target_num_replicas"),
        )
    return out


def wait_running(name: str, timeout_s: float = 120.0) -> None:
    """Block until the application runs; raise with Serve's message when it fails or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = app_states().get(name)
        if app is not None:
            if app.status == "RUNNING":
                return
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"application {name} is {app.status}: {app.message}")
        time.sleep(0.2)
    raise TimeoutError(f"application {name} not running after {timeout_s:.0f} s")
