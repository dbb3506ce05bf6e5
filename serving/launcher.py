"""`enginehouse up`: embedded (or joined) Ray, Ray Serve on the HAProxy ingress, the control plane."""

from __future__ import annotations

import logging
import os
import runpy
import signal
from pathlib import Path
from typing import Any

from serving.settings import Settings

log = logging.getLogger("enginehouse")

# Measured in ../shared/ARCHITECTURE.md: the HAProxy ingress is ~5x Ray Serve's Python proxy here.
DATA_PLANE_FLAGS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


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


def deploy(services: dict[str, dict[str, Any]], replica_cpus: float) -> None:
    """Deploy every service as its own Ray Serve application under ``/v1/infers/{service_id}``."""
    from serving.dataplane import deploy as serve_apps

    for sid, svc in services.items():
        serve_apps.put(serve_apps.service_app(sid, svc["versions"], num_cpus=replica_cpus))
        log.info("deploying service %s (%d version(s))", sid, len(svc["versions"]))
    for sid in services:
        serve_apps.wait_running(sid)


def run_up(settings: Settings) -> int:
    """Start everything and serve until Ctrl-C or SIGTERM, then shut it all down."""
    import ray
    import uvicorn

    from serving.controlplane.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    repo = settings.model_repository
    build = repo / "build.py"
    if build.is_file():  # example models are built by code, never downloaded
        runpy.run_path(str(build), run_name="enginehouse_build")["ensure_examples"](repo)
    services = discover(repo)
    start_ray(settings)
    try:
        deploy(services, settings.replica_cpus)
        app = create_app(services, f"http://{settings.data_host}:{settings.data_port}")
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

            for sid in services:
                serve_apps.remove(sid)
        # the embedded Ray takes its Serve actors down with it (serve.shutdown() first waits 30 s here)
        ray.shutdown()
    return 0
