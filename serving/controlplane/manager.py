"""What the management API does, transport-free: register models, create/update/delete services, shape answers.

The routes in ``serving.controlplane.app`` only translate HTTP; the launcher seeds the example models through
the same methods. Desired state goes to the registry; the reconciler makes Ray Serve match it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import CONFIG_FILE, ModelConfig, read_model_config
from runtimes.catalogue import build_catalogue
from runtimes.registry import adapter_class
from serving.controlplane import batch as batch_services
from serving.controlplane import cluster, templates
from serving.controlplane.errors import (
    InvalidRequest,
    InvalidTransition,
    ModelNotDeployable,
    PathNotAllowed,
    UnknownRuntime,
)
from serving.controlplane.schemas import ModelCreate, ServiceConfigEntry, ServiceCreate, ServiceUpdate
from serving.dataplane.asyncq import AsyncQueue
from serving.dataplane.deploy import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S
from serving.registry import NotFound, Registry
from serving.registry.db import now_ms
from serving.registry.schema import Model, ModelServiceTemplate, Service

log = logging.getLogger("enginehouse.controlplane")

DEFAULT_PROJECT = "default"
REPLICA_STATUSES_UP = ("running", "concerning")


def resolve_source(location: str, roots: list[Path], field: str = "source_location", must_exist: bool = True) -> Path:
    """The real path of a model source (or batch folder, ``field``): absolute, existing unless ``must_exist`` is
    false, and resolving (symlinks followed) inside an allowed root."""
    raw = Path(location).expanduser()
    if not raw.is_absolute():
        raise PathNotAllowed(f"{field} {location!r} must be an absolute path")
    try:
        real = raw.resolve(strict=must_exist)
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte
        raise PathNotAllowed(f"{field} {location!r} does not exist or cannot be read") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise PathNotAllowed(
            f"{field} {location!r} resolves to {real}, outside the allowed roots "
            f"({', '.join(map(str, roots))}); set ENGINEHOUSE_ALLOWED_ROOTS to allow another folder"
        )
    return real


def disk_size(path: Path) -> int:
    """Bytes on disk of a file, or of every regular file under a folder (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class Manager:
    """The control plane's operations over the registry; ``wake`` nudges the reconciler after a change."""

    registry: Registry
    data_address: str
    roots: list[Path]
    wake: Callable[[], None] = lambda: None
    queue: AsyncQueue | None = None  # the async queue, read for its depth
    histograms: Any = None  # serving.controlplane.metrics.Histograms the reconciler fills
    loop: asyncio.AbstractEventLoop | None = None
    catalogue: dict[str, Any] = field(default_factory=build_catalogue)
    _tasks: set[concurrent.futures.Future[None]] = field(default_factory=set)

    # models -----------------------------------------------------------------------------------------------
    def _runtime(self, engine: str, wanted: str | None) -> str:
        # the catalogue lists a runtime once per request mode; keep each name once, in order
        items = self.catalogue["engine_runtimes"]
        names = list(dict.fromkeys(r for item in items if item["ai_engine"] == engine for r in item["runtimes"]))
        if wanted is None:
            return names[0] if names else ""
        if wanted not in names:
            raise UnknownRuntime(f"runtime {wanted!r} is not offered for {engine}; runtimes: {', '.join(names)}")
        return wanted

    def _engine_config(
        self, body: ModelCreate, src: Path, template: ModelServiceTemplate | None = None
    ) -> tuple[Path, ModelConfig]:
        model_dir, model_file = (src.parent, src.name) if src.is_file() else (src, None)
        data: dict[str, Any] = {"engine": body.model_type}
        if src.is_dir() and (src / CONFIG_FILE).is_file():
            shipped = read_model_config(src)
            if shipped.engine != body.model_type:
                raise InvalidRequest(
                    f"model_type: {body.model_type} given, but {src / CONFIG_FILE} says engine {shipped.engine}"
                )
            data = shipped.model_dump(exclude_none=True)
        elif model_file:
            data["model_file"] = model_file
        custom = {
            k: getattr(body, k)
            for k in ("image", "start_command", "container_command", "container_args", "port")
            if getattr(body, k) is not None
        }
        if body.model_type == "Custom":
            if template is not None:  # the recipe first; what the model gives itself wins
                recipe = templates.custom_fields(template, body.template_params or {})
                if custom.get("start_command") or custom.get("image"):
                    recipe = {k: v for k, v in recipe.items() if k in ("env", "port")}
                recipe["env"] = {**data.get("env", {}), **recipe["env"]}
                data.update(recipe)
            if template is None or "health_path" in body.model_fields_set:
                data["health_path"] = body.health_path
            data.update(custom)
        data["runtime"] = self._runtime(body.model_type, body.runtime or data.get("runtime"))
        adapter_class(body.model_type)  # an engine whose package is missing is refused now, with the extra
        return model_dir, ModelConfig.model_validate(data)

    def register_model(self, project: str, body: ModelCreate) -> str:
        """Store the version as ``publishing`` and validate it with its engine in the background."""
        src = resolve_source(body.source_location, self.roots)
        template = None
        if body.template is not None:
            try:
                template = self.registry.get_template(body.template)
            except NotFound:
                raise InvalidRequest(f"template: model-service template {body.template} not found") from None
            if not template.system and template.project_id != project:
                raise InvalidRequest(f"template: model-service template {body.template} not found")
        model_dir, config = self._engine_config(body, src, template)
        model_id = self.registry.add_model(
            project,
            model_name=body.model_name,
            model_version=body.model_version,
            model_type=body.model_type,
            runtime=config.runtime or "",
            source_location=body.source_location,
            description=body.description,
            install_type=list(body.install_type),
            specification=body.specification.model_dump(exclude_none=True),
            model_size=disk_size(src),
            engine_config={"model_dir": str(model_dir), "config": config.model_dump(exclude_none=True)},
            template_uuid=template.uuid if template is not None else None,
        )
        log.info("model %s %s registered in %s as %s", body.model_name, body.model_version, project, model_id)
        self.validate_later(project, model_id)
        return model_id

    def validate_later(self, project: str, model_id: str) -> None:
        """Schedule the engine probe of a model on the control plane's loop."""
        self._spawn(self._validate(project, model_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self.loop is not None, "the manager runs inside the control plane's event loop"
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def _validate(self, project: str, model_id: str) -> None:
        from serving.controlplane.probe import probe

        try:
            row = await asyncio.to_thread(self.registry.get_model, project, model_id)
            assert row.engine_config is not None
            result = await probe(row.engine_config["model_dir"], row.engine_config["config"])
        except NotFound:
            return  # deleted while publishing
        except Exception as exc:  # Ray itself failed: the model is not known good
            result = {"error": f"validation could not run: {type(exc).__name__}: {exc}"}
        status = "failed" if "error" in result else "published"
        try:
            await asyncio.to_thread(
                self.registry.set_model_status,
                project,
                model_id,
                status,
                error_msg=result.get("error"),
                signature=result.get("signature"),
            )
        except NotFound:
            return
        log.info("model %s %s%s", model_id, status, f": {result['error']}" if "error" in result else "")
        self.wake()

    def model_view(self, row: Model, detail: bool = False) -> dict[str, Any]:
        """A ModelListItem, plus source, runtime, signature and error for the detail."""
        out: dict[str, Any] = {
            "model_id": row.model_id,
            "model_name": row.model_name,
            "model_version": row.model_version,
            "model_type": row.model_type,
            "model_size": row.model_size,
            "model_status": row.model_status,
            "description": row.description,
            "install_type": row.install_type,
            "specification": row.specification,
            "create_at": row.create_at,
            "tenant": row.project_id,
            "project": row.project_id,
            "owner": row.project_id,
            "workspace_id": "0",
            "model_source": "custom",
            "market_flag": False,
            "tunable": False,
            "publishable_flag": False,
        }
        if detail:
            out.update(
                runtime=row.runtime,
                source_location=row.source_location,
                apis=row.signature,
                input_params=(row.signature or {}).get("inputs"),
                output_params=(row.signature or {}).get("outputs"),
            )
            if row.model_status == "failed":
                out["error_msg"] = row.error_msg
            if row.custom:
                out["custom"] = row.custom
            if row.template_uuid:
                out["template"] = row.template_uuid
        return out

    # services ---------------------------------------------------------------------------------------------
    def _entries(self, project: str, infer_type: str, config: list[ServiceConfigEntry]) -> list[dict[str, Any]]:
        nodes = cluster.ray_nodes()
        versions: dict[str, int] = {}
        out = []
        for i, entry in enumerate(config):
            try:
                model = self.registry.get_model(project, entry.model_id)
            except NotFound:
                raise InvalidRequest(f"config[{i}].model_id: model {entry.model_id} not found in {project}") from None
            if model.model_status == "failed":
                raise ModelNotDeployable(
                    f"config[{i}]: model {model.model_name} {model.model_version} failed validation: {model.error_msg}"
                )
            if infer_type not in model.install_type:
                raise ModelNotDeployable(
                    f"config[{i}]: model {model.model_name} {model.model_version} is registered for "
                    f"{model.install_type}, not {infer_type}"
                )
            if model.model_version in versions:  # X-Model-Version must name one entry
                raise InvalidRequest(
                    f"config[{i}]: version {model.model_version} is already config[{versions[model.model_version]}]; "
                    "the versions of one service must differ"
                )
            versions[model.model_version] = i
            if entry.specification != "custom":
                cluster.flavour_resources(entry.specification, nodes)  # unknown flavour: 400 naming the valid ones
            out.append(
                entry.model_dump(exclude_none=True)
                | {"model_name": model.model_name, "model_version": model.model_version}
            )
        return out

    def create_service(self, project: str, body: ServiceCreate) -> str:
        """Store a real-time service as ``deploying``; the reconciler deploys it."""
        entries = self._entries(project, body.infer_type, body.config)
        batch_fields = (body.src_path, body.dest_path, body.mapping_type, body.mapping_rule)
        batch = None
        if body.infer_type == "batch":
            if body.schedule:
                raise InvalidRequest("schedule: a batch service ends by itself (finished); auto-stop is real-time")
            model = self.registry.get_model(project, entries[0]["model_id"])
            batch = batch_services.check_request("new", *batch_fields, config=entries, model=model, roots=self.roots)
        elif any(f is not None for f in batch_fields):
            raise InvalidRequest("src_path/dest_path/mapping_type/mapping_rule are only read with infer_type batch")
        service_id = self.registry.add_service(
            project,
            service_name=body.service_name,
            description=body.description,
            infer_type=body.infer_type,
            config=entries,
            schedule=[s.model_dump() for s in body.schedule] if body.schedule else None,
            batch=batch,
        )
        self.registry.add_event(service_id, "deploying", "service created")
        log.info("service %s created in %s as %s", body.service_name, project, service_id)
        self.wake()
        return service_id

    def update_service(self, project: str, service_id: str, body: ServiceUpdate) -> Service:
        """Apply an update: weights live, a new config redeploys, status starts or stops, schedule re-arms."""
        row = self.registry.get_service(project, service_id)
        if row.status == "deleting":
            raise InvalidTransition(f"service {service_id} is being deleted")
        t = now_ms()
        fields: dict[str, Any] = {"operation_time": t}
        reasons = []
        if body.description is not None:
            fields["description"] = body.description
        if body.config is not None and row.infer_type == "batch":
            raise InvalidRequest("config: a batch service's model and resources are fixed; create a new batch service")
        if body.config is not None:
            fields["config"] = self._entries(project, row.infer_type, body.config)
            weights = ", ".join(f"{e['model_version']}={e['weight']}" for e in fields["config"])
            reasons.append(f"config updated (weights {weights})")
            if row.status == "failed":  # a new config is a new attempt
                fields.update(status="deploying", progress=0, error_msg=None)
        if body.schedule is not None:
            fields["schedule"] = [s.model_dump() for s in body.schedule] or None
            fields["due_time"] = None  # re-armed when the service (next) reaches running
            if body.schedule and row.status in REPLICA_STATUSES_UP:
                fields["due_time"] = t + body.schedule[0].seconds() * 1000
        if body.status == "running" and (row.desired_status != "running" or row.status == "failed"):
            fields.update(desired_status="running", status="deploying", progress=0, error_msg=None, due_time=None)
            reasons.append("started by the user")
        elif body.status == "stopped" and row.desired_status != "stopped":
            fields.update(desired_status="stopped", status="stopping")
            reasons.append("stopped by the user")
        updated = self.registry.update_service(project, service_id, **fields)
        if reasons:
            self.registry.add_event(service_id, updated.status, "; ".join(reasons))
        log.info("service %s updated: %s", service_id, "; ".join(reasons) or "description or schedule")
        self.wake()
        return updated

    def delete_service(self, project: str, service_id: str) -> None:
        """Mark the service ``deleting``; the reconciler removes its application, then forgets it."""
        row = self.registry.get_service(project, service_id)
        if row.status != "deleting":
            self.registry.update_service(project, service_id, status="deleting", operation_time=now_ms())
            self.registry.add_event(service_id, "deleting", "deleted by the user")
            log.info("service %s deleting", service_id)
        self.wake()

    def service_view(self, row: Service) -> dict[str, Any]:
        """The service detail: the fields of the reference's service detail that apply here."""
        counts = self.registry.get_counts(row.service_id)
        up = row.status in REPLICA_STATUSES_UP
        out: dict[str, Any] = {
            "service_id": row.service_id,
            "service_name": row.service_name,
            "description": row.description,
            "tenant": row.project_id,
            "project": row.project_id,
            "owner": row.project_id,
            "workspace_id": "0",
            "publish_at": row.publish_at,
            "update_time": row.update_time,
            "operation_time": row.operation_time,
            "transition_at": row.transition_at,
            "infer_type": row.infer_type,
            "status": row.status,
            "config": [
                {
                    "model_id": e["model_id"],
                    "model_name": e["model_name"],
                    "model_version": e["model_version"],
                    "weight": e["weight"],
                    "specification": e["specification"],
                    "custom_spec": e.get("custom_spec", {}),
                    "instance_count": e["instance_count"],
                    "scaling": e["scaling"],
                    "envs": e["envs"],
                    "max_batch_size": e["max_batch_size"],
                    "batch_timeout_ms": e["batch_timeout_ms"],
                    "max_queue_size": e.get("max_queue_size", DEFAULT_MAX_QUEUE),
                    "request_timeout_s": e.get("request_timeout_s", DEFAULT_TIMEOUT_S),
                    "status": "running" if up else "notReady",
                    "support_debug": False,
                    "additional_properties": {},
                }
                for e in row.config
            ],
            "invocation_times": sum(inv for inv, _ in counts.values()),
            "failed_times": sum(failed for _, failed in counts.values()),
            "is_shared": False,
            "shared_count": 0,
            "is_free": False,
            "additional_properties": {},
        }
        if row.infer_type == "batch":
            batch_services.view(row, out)
        if row.infer_type == "real-time":
            out["access_address"] = f"{self.data_address}/v1/infers/{row.service_id}"
            if self.queue is not None:
                out["async_queue"] = self.queue.depth(row.service_id)
        if row.status == "deploying" and row.infer_type == "real-time":
            out["progress"] = row.progress
        if row.status in ("failed", "waiting", "concerning") and row.error_msg:
            out["error_msg"] = row.error_msg
        if row.schedule:
            out["schedule"] = row.schedule
        if row.due_time is not None:
            out["due_time"] = row.due_time
        return out
