"""The reconciler: makes Ray Serve match the registry's desired state and writes back what it observes.

Every tick (``reconcile_interval_s``, or at once when the API changes something) it reads every service,
builds the Ray Serve application of each one that should run, submits the whole set when it changed, and
turns Serve's application and replica states into the service lifecycle: ``deploying`` (with progress),
``waiting`` (no node can hold a replica, or the cluster is busy), ``running``, ``concerning`` (fewer
replicas running than asked), ``failed`` (with the engine's error), ``stopping``/``stopped``,
``deleting``. Each transition is an event with its reason. Auto-stop schedules are enforced here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.controlplane import cluster
from serving.controlplane.batch import BatchDriver
from serving.controlplane.schemas import Schedule
from serving.dataplane import deploy, gateway
from serving.registry import NotFound, Registry
from serving.registry.db import now_ms
from serving.registry.schema import Model, Service

log = logging.getLogger("enginehouse.reconciler")

MB = 1024 * 1024
#: a replica actor pending this long for resources makes a deploying service ``waiting``
PENDING_GRACE_S = 2.0
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)): (.+)$")


@dataclass
class ReplicaPlan:
    """How one service becomes a Ray Serve application, and what one replica asks of a node."""

    app: dict[str, Any]
    demand: dict[str, float]
    replicas: int
    autoscaling: bool


def _engine_error(message: str) -> str:
    """The engine's own reason out of Ray Serve's deploy-failure text (a traceback), else the text.

    The reason is the last exception line and the lines after it: a message that goes on over several
    lines (a custom server's last log lines) is kept whole.
    """
    lines = message.splitlines()
    found = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not found:
        return message.strip()[-2000:]
    first = _EXCEPTION_LINE.match(lines[found[-1]])
    assert first is not None
    return "\n".join([first.group(3).strip(), *lines[found[-1] + 1 :]]).strip()[:2000]


def _pending_replicas(app: str) -> int:
    """Replica actors of an application that Ray has not placed yet (waiting for resources)."""
    # Ray has no public per-actor state without its dashboard; the GCS actor table is the one source here.
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app}#"
    return sum(
        1
        for a in state.actors().values()
        if (a.get("Name") or "").startswith(prefix) and a["State"] == "PENDING_CREATION"
    )


def _fits(demand: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in demand.items() if v > 0)


def _show(demand: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / MB:.0f} MB" if k == "memory" else f"{k} {v:g}" for k, v in demand.items() if v > 0)


def plan(
    row: Service,
    models: dict[str, Model],
    nodes: list[cluster.NodeInfo],
    tokens: dict[str, str] | None = None,
    async_queue: dict[str, Any] | None = None,
) -> ReplicaPlan:
    """The Serve application of a service: every version in each replica (one hop), resources per replica.

    CPU, GPU and NPU are the largest any version asks (the versions share the replica's engine threads);
    memory is the sum (every version is resident); the replica count is the largest ``instance_count``.
    """
    cpu = gpu = 0.0
    memory = 0
    npu: dict[str, float] = {}
    versions: list[dict[str, Any]] = []
    envs: dict[str, str] = {}
    for e in row.config:
        res = resources_of(e, nodes)
        cpu, gpu, memory = max(cpu, res["cpu"]), max(gpu, res["gpu"]), memory + int(res.get("memory") or 0)
        for k, v in (res.get("npu") or {}).items():
            npu[k] = max(npu.get(k, 0.0), float(v))
        model = models[e["model_id"]]
        assert model.engine_config is not None
        versions.append(
            {
                "version": model.model_version,
                "model_dir": model.engine_config["model_dir"],
                "config": model.engine_config["config"],
                "weight": e["weight"],
                "max_batch_size": e.get("max_batch_size", 32),
                "batch_timeout_ms": e.get("batch_timeout_ms", 0.0),
                "max_queue_size": e.get("max_queue_size", deploy.DEFAULT_MAX_QUEUE),
                "request_timeout_s": e.get("request_timeout_s", deploy.DEFAULT_TIMEOUT_S),
            }
        )
        envs.update(e.get("envs") or {})
    replicas = max(e["instance_count"] for e in row.config)
    scaling = any(e.get("scaling") for e in row.config)
    app = deploy.service_app(
        row.service_id,
        versions,
        num_cpus=cpu,
        num_replicas=replicas,
        num_gpus=gpu,
        memory_mb=memory or None,
        resources=npu or None,
        env_vars=envs or None,
        max_replicas=replicas * 4 if scaling else None,
        service_name=row.service_name,
        auth={"project": row.project_id, "tokens": tokens} if tokens else None,
        async_queue=async_queue,
    )
    demand = {"CPU": cpu, "GPU": gpu, "memory": float(memory * MB), **npu}
    return ReplicaPlan(app=app, demand=demand, replicas=replicas, autoscaling=scaling)


def resources_of(entry: dict[str, Any], nodes: list[cluster.NodeInfo]) -> dict[str, Any]:
    """One config entry's resources per replica: ``cpu``, ``gpu``, ``memory`` (MB or None), ``npu`` keys."""
    if entry["specification"] != "custom":
        return cluster.flavour_resources(entry["specification"], nodes)
    return _custom_resources(entry["custom_spec"], nodes)


def _custom_resources(spec: dict[str, Any], nodes: list[cluster.NodeInfo]) -> dict[str, Any]:
    npu: dict[str, float] = {}
    if spec.get("ascend_a310"):
        # the NPU plugin names the resource (e.g. huawei.com/ascend-310); with none in the cluster the
        # demand names a key no node has, so the service waits and says why
        keys = cluster.npu_keys({k for n in nodes for k in n.total}) or ["huawei.com/ascend-310"]
        npu[keys[0]] = float(spec["ascend_a310"])
    return {"cpu": spec["cpu"], "gpu": spec.get("gpu_p4", 0.0), "memory": spec.get("memory"), "npu": npu}


class Reconciler:
    """One loop in the control plane's process; the only writer of service status."""

    def __init__(
        self,
        registry: Registry,
        interval_s: float = 1.0,
        tokens: Callable[[], dict[str, str]] | None = None,
        async_queue: dict[str, Any] | None = None,
        data_address: str | None = None,
        observe: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.registry = registry
        self.observe = observe  # gets each committed count batch's histograms
        self.data_address = data_address  # probed once before a service is called running
        self.async_queue = async_queue  # {"url", "retention_s"}: where the replicas keep async requests
        self.tokens = tokens or (lambda: {})  # {sha256: project} the replicas check; empty: auth off
        self._sink: Any = None  # the replicas' counter batches wait there for us
        self.interval_s = interval_s
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._since: dict[str, float] = {}  # service -> when its current deploy attempt was first seen pending
        self._tokens: dict[str, str] = {}  # this tick's tokens
        self._batches = BatchDriver(self._set, registry)

    def wake(self) -> None:
        """Run the next tick now (thread-safe)."""
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    async def run(self) -> None:
        """Tick until cancelled; a failing tick is logged and retried, never fatal."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("reconcile tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), self.interval_s)
            self._event.clear()

    # one pass ---------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Compare, submit, observe: one reconcile pass."""
        _, rows = self.registry.list_services(None, limit=1_000_000)
        apps = deploy.app_states()
        nodes = cluster.ray_nodes()
        self._tokens = self.tokens()
        # every model of every service in one read, not one per config entry per tick
        models = self.registry.models_by_id({e["model_id"] for row in rows for e in row.config})
        desired: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row.infer_type == "batch":
                try:
                    self._batches.step(row, models, nodes)
                except NotFound:
                    pass  # deleted under us
                except Exception:  # one batch service's trouble must not stop the others' reconciling
                    log.exception("batch service %s: reconcile step failed; retrying", row.service_id)
                continue
            try:
                self._service(row, apps.get(row.service_id), nodes, models, desired)
            except NotFound:
                continue  # deleted under us
        # the OIP routes at the data plane's root find running services by name through this application
        routed: dict[str, dict[str, str]] = {}
        for row in rows:
            if row.infer_type == "real-time" and row.service_id in desired and row.status in ("running", "concerning"):
                routed.setdefault(row.project_id, {})[row.service_name] = row.service_id
        desired[gateway.APP] = gateway.gateway_app(routed, self._tokens)
        deploy.sync(desired)
        self._collect_counts()

    def _collect_counts(self) -> None:
        from serving.dataplane import counters

        if self._sink is None:
            self._sink = counters.start_sink()
        try:
            counters.drain(self._sink, self.registry.apply_counts, self.observe)
        except Exception:
            self._sink = None  # gone with its node: a new one is made next tick; replicas resend
            raise

    def _set(self, row: Service, status: str, reason: str = "", **fields: Any) -> None:
        if status == row.status and all(getattr(row, k) == v for k, v in fields.items()):
            return
        if status != row.status:
            if status == "running" and row.schedule and row.due_time is None:
                fields["due_time"] = now_ms() + Schedule.model_validate(row.schedule[0]).seconds() * 1000
                reason = f"{reason}; auto-stop in {row.schedule[0]['duration']} {row.schedule[0]['time_unit']}"
            log.info("service %s (%s): %s -> %s %s", row.service_name, row.service_id, row.status, status, reason)
            self.registry.add_event(row.service_id, status, reason)
        # update_time is when the configuration in use last changed, not when its status moved
        self.registry.update_service(
            row.project_id, row.service_id, status=status, update_time=row.update_time, **fields
        )

    def _service(
        self,
        row: Service,
        app: deploy.AppState | None,
        nodes: list[cluster.NodeInfo],
        all_models: dict[str, Model],
        desired: dict[str, Any],
    ) -> None:
        if row.status == "deleting":
            if app is None:
                self.registry.delete_service(row.project_id, row.service_id)
                log.info("service %s deleted", row.service_id)
            return
        if row.desired_status == "stopped":
            done = "stopped" if app is None else "stopping"
            self._set(row, done, done)
            return
        if row.status == "failed":
            return  # stays down until the user updates or restarts it
        if row.due_time is not None and now_ms() >= row.due_time and row.status in ("running", "concerning"):
            self.registry.update_service(row.project_id, row.service_id, desired_status="stopped")
            self._set(row, "stopping", "auto-stop schedule reached")
            return
        models = {e["model_id"]: all_models[e["model_id"]] for e in row.config}
        failed = [m for m in models.values() if m.model_status == "failed"]
        if failed:
            m = failed[0]
            self._set(row, "failed", f"model {m.model_name} {m.model_version} failed validation", error_msg=m.error_msg)
            return
        publishing = sum(m.model_status == "publishing" for m in models.values())
        if publishing:
            progress = 30 * (len(models) - publishing) // len(models)
            self._set(row, "deploying", "waiting for model validation", progress=progress)
            return
        p = plan(row, models, nodes, self._tokens, self.async_queue)
        desired[row.service_id] = p.app
        self._observe(row, app, p, nodes, desired)

    def _routed(self, service_id: str) -> bool:
        """True once the data plane's ingress routes the service (Serve says RUNNING a moment before)."""
        if self.data_address is None:
            return True
        import httpx

        try:
            r = httpx.get(f"{self.data_address}/v1/infers/{service_id}/v2/health/live", timeout=2.0)
        except httpx.HTTPError:
            return False
        # the proxy's own 404 names the path; anything else came from the replica (or the user's server)
        return not (r.status_code == 404 and r.text.startswith("Path '"))

    def _observe(
        self,
        row: Service,
        app: deploy.AppState | None,
        p: ReplicaPlan,
        nodes: list[cluster.NodeInfo],
        desired: dict[str, Any],
    ) -> None:
        if not any(n.alive and _fits(p.demand, n.total) for n in nodes):
            biggest = max((n.total for n in nodes if n.alive), key=lambda t: t.get("CPU", 0), default={})
            self._set(
                row,
                "waiting",
                "no node can hold a replica",
                error_msg=f"each replica needs {_show(p.demand)}; the largest node has "
                f"{_show({k: biggest.get(k, 0.0) for k in p.demand})}. Add a node or ask for less.",
            )
            return
        if app is None:
            self._set(row, "deploying", "submitted to Ray Serve", progress=max(row.progress, 40))
            return
        status = app.status
        stale = status == "DEPLOY_FAILED" and app.last_deployed_time_s * 1000 < row.operation_time
        if status == "DELETING" or stale:
            # the failure (or the removal) predates the user's restart: let the old application go first,
            # then the next ticks submit it afresh
            desired.pop(row.service_id, None)
            self._set(row, "deploying", "replacing the previous deployment", progress=max(row.progress, 10))
            return
        states = app.replica_states
        running = states.get("RUNNING", 0)
        if status == "DEPLOY_FAILED":
            desired.pop(row.service_id, None)  # free the resources; the user retries with an update or a start
            self._since.pop(row.service_id, None)
            message = app.message
            self._set(row, "failed", "deployment failed", error_msg=_engine_error(message))
            return
        if status == "RUNNING" and running >= (1 if p.autoscaling else p.replicas):
            if row.status not in ("running", "concerning") and not self._routed(row.service_id):
                self._set(row, "deploying", "waiting for the ingress to route", progress=99)
                return
            self._since.pop(row.service_id, None)
            self._set(row, "running", "all replicas running", progress=100, error_msg=None)
            return
        if row.status == "running" and status == "DEPLOYING" and running:
            return  # a config update (more replicas, new weights) rolling out while the old replicas serve
        if row.status in ("running", "concerning") or status == "UNHEALTHY":
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))
            self._set(
                row,
                "concerning",
                f"{running} of {p.replicas} replicas running",
                error_msg=f"{running} of {p.replicas} replicas running ({detail})",
            )
            return
        first = self._since.setdefault(row.service_id, time.monotonic())
        # a replica actor also pends while its worker process starts: only short resources make it "waiting"
        starved = not any(n.alive and _fits(p.demand, n.available) for n in nodes)
        if time.monotonic() - first > PENDING_GRACE_S and starved and _pending_replicas(row.service_id):
            self._set(
                row,
                "waiting",
                "the cluster is busy",
                error_msg=f"waiting for free resources: each replica needs {_show(p.demand)}; it deploys as soon as "
                "other services free them",
            )
            return
        progress = 40 + 59 * running // max(p.replicas, 1)
        self._set(row, "deploying", "replicas starting", progress=max(progress, row.progress), error_msg=None)
