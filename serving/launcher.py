"""`enginehouse up`: embedded (or joined) Ray, Ray Serve on the HAProxy ingress, the control plane."""

from __future__ import annotations

import asyncio
import logging
import os
import runpy
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select

from serving.controlplane.manager import DEFAULT_PROJECT, Manager
from serving.logs import setup_logging
from serving.registry import Registry, open_registry
from serving.registry.schema import Model
from serving.settings import Settings, check_exposure

log = logging.getLogger("enginehouse")

# Measured in ../shared/ARCHITECTURE.md: the HAProxy ingress is ~5x Ray Serve's Python proxy here. Ray's
# HAProxy metrics parse one log line per request in Python (0.1 core at 2,000 rps; off: +15 % rps in
# benchmarks/dataplane.py); Enginehouse counts requests itself.
DATA_PLANE_FLAGS = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def discover(repository: Path) -> dict[str, dict[str, Any]]:
    """Services to deploy from a Triton-like repository: one per model, every version at equal weight."""
    services: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        versions = sorted(v for v in model_dir.iterdir() if (v / "config.json").is_file())
        if not versions:
            continue
        share, rest = divmod(100, len(versions))
        services[model_dir.name] = {
            "service_name": model_dir.name,
            "model_name": model_dir.name,
            "versions": [
                {"version": v.name, "model_dir": str(v), "weight": share + (1 if i < rest else 0)}
                for i, v in enumerate(versions)
            ],
        }
    return services


def start_ray(settings: Settings) -> None:
    """Join ``settings.address`` or start an embedded Ray kept on 127.0.0.1, then Ray Serve."""
    import ray
    from ray import serve

    for key, value in DATA_PLANE_FLAGS.items():
        os.environ.setdefault(key, value)
    if settings.address:
        ray.init(address=settings.address)
    else:
        # keeps every Ray port (HAProxy mode too) on loopback for the embedded default
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from runtimes.accelerators import ray_resources

        res = ray_resources()
        ray.init(
            num_cpus=settings.num_cpus or os.cpu_count(),
            num_gpus=res.get("num_gpus", 0),
            resources=res.get("resources") or None,
            include_dashboard=False,
        )
    serve.start(http_options={"host": settings.data_host, "port": settings.data_port})


def seed_examples(manager: Manager, services: dict[str, dict[str, Any]], replica_cpus: float) -> None:
    """On first start (no model and no service yet), register every example version and deploy one service
    per example model, every version at an equal weight, through the same code as the API."""
    from runtimes.base import read_model_config
    from serving.controlplane.schemas import CustomSpec, ModelCreate, ServiceConfigEntry, ServiceCreate

    reg = manager.registry
    if reg.list_models(DEFAULT_PROJECT, limit=1)[0] or reg.list_services(DEFAULT_PROJECT, limit=1)[0]:
        return
    for name, svc in services.items():
        entries = []
        for v in svc["versions"]:
            cfg = read_model_config(v["model_dir"])
            model_id = manager.register_model(
                DEFAULT_PROJECT,
                ModelCreate(
                    model_name=name,
                    model_version=v["version"],
                    model_type=cfg.engine,
                    source_location=v["model_dir"],
                    description=f"example model {name} from {Path(v['model_dir']).parent.parent}",
                    start_command=cfg.start_command,
                    image=cfg.image,
                    port=cfg.port,
                    health_path=cfg.health_path,
                ),
            )
            entries.append(
                ServiceConfigEntry(
                    model_id=model_id,
                    weight=v["weight"],
                    specification="custom",
                    custom_spec=CustomSpec(cpu=replica_cpus),
                )
            )
        manager.create_service(
            DEFAULT_PROJECT, ServiceCreate(service_name=name, description=f"example service {name}", config=entries)
        )
        log.info("registered example %s (%d version(s))", name, len(entries))


def resume(manager: Manager) -> None:
    """After a restart: validate again the models whose validation the last run did not finish."""
    reg = manager.registry
    with reg.session() as s:
        pending = s.execute(select(Model.project_id, Model.model_id).where(Model.model_status == "publishing")).all()
    for project, model_id in pending:
        manager.validate_later(project, model_id)


def control_plane(
    settings: Settings, registry: Registry, seed: dict[str, dict[str, Any]] | None = None
) -> tuple[FastAPI, Manager]:
    """The control-plane app with its manager and reconciler, started and stopped by the app's lifespan."""
    from serving.controlplane import templates
    from serving.controlplane.app import create_app
    from serving.controlplane.auth import Authenticator
    from serving.controlplane.metrics import Histograms
    from serving.controlplane.reconciler import Reconciler
    from serving.dataplane.asyncq import open_queue

    templates.seed_system(registry)
    auth = Authenticator(registry, settings.tokens())
    queue = {"url": settings.queue_url(), "retention_s": settings.async_retention_s}
    data_address = f"http://{settings.data_host}:{settings.data_port}"
    histograms = Histograms()
    reconciler = Reconciler(
        registry,
        settings.reconcile_interval_s,
        tokens=auth.token_map,
        async_queue=queue,
        data_address=data_address,
        observe=histograms.add,
    )
    manager = Manager(
        registry=registry,
        data_address=data_address,
        roots=settings.roots(),
        wake=reconciler.wake,
        queue=open_queue(settings.queue_url(), settings.async_retention_s),
        histograms=histograms,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.loop = asyncio.get_running_loop()
        task = asyncio.create_task(reconciler.run())
        await asyncio.to_thread(resume, manager)
        if seed:
            await asyncio.to_thread(seed_examples, manager, seed, settings.replica_cpus)
        try:
            yield
        finally:
            task.cancel()

    app = create_app(manager, auth, lifespan=lifespan)
    return app, manager


def run_up(settings: Settings) -> int:
    """Start everything and serve until Ctrl-C or SIGTERM, then shut it all down."""
    import ray
    import uvicorn

    setup_logging(settings.log_format)
    os.environ["ENGINEHOUSE_LOG_FORMAT"] = settings.log_format  # read where the Serve configs are built
    registry = open_registry(settings.database_url, settings.home)
    check_exposure(settings, registry.count_tokens())
    repo = settings.model_repository
    build = repo / "build.py"
    if build.is_file():  # example models are built by code, never downloaded
        runpy.run_path(str(build), run_name="enginehouse_build")["ensure_examples"](repo)
    start_ray(settings)
    try:
        app, _ = control_plane(settings, registry, seed=discover(repo))
        log.info(
            "control plane on http://%s:%d, data plane on http://%s:%d",
            settings.host,
            settings.port,
            settings.data_host,
            settings.data_port,
        )
        # uvicorn turns SIGINT/SIGTERM into a graceful stop, then re-raises the signal into the handler it
        # found; Ray's driver handler would turn that into exit status 15. A clean stop is a success, so
        # the handler uvicorn restores is a no-op and the `finally` below does the shutting down.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        if settings.address:  # a joined cluster is not ours to stop: remove only our applications
            from serving.dataplane import deploy as serve_apps

            serve_apps.sync({})
        # the embedded Ray takes its Serve actors down with it (serve.shutdown() first waits 30 s here)
        ray.shutdown()
        registry.close()
    return 0
