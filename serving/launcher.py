"""`enginehouse up`: embedded (or joined) Ray, Ray Serve on the HAProxy ingress, the control plane."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import runpy
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
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
#: exit status of `enginehouse up` when its embedded Ray died under it: a supervisor starts it again, and the
#: services come back from the registry
EXIT_RAY_DIED = 4  # uvicorn's start-up failure (a busy port) is 3
#: in the environment of every process `up` starts (its home, resolved): a restarted `up` finds what a killed one
#: left behind by it; `up`'s own pid and start time are in ``<home>/up.pid`` while it runs
OWNER_ENV = "ENGINEHOUSE_UP_HOME"
PIDFILE = "up.pid"


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


def _become_subreaper() -> None:
    """Linux: orphans of our descendants become our children instead of init's, so nothing the embedded Ray
    started escapes the clean-up (HAProxy outlives its dead manager actor, on the data port)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_descendants(sig: int = signal.SIGTERM, wait_first_s: float = 0.0, grace_s: float = 5.0) -> list[str]:
    """Every process below this one: given ``wait_first_s`` to exit by itself, then ``sig``, then SIGKILL after
    ``grace_s``. Returns those that had to be signalled, as ``name[pid]``."""
    import psutil  # Ray vendors it (ray/thirdparty_files)

    _, procs = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=wait_first_s)
    named = []
    for p in procs:
        with suppress(psutil.Error):
            named.append(f"{p.name()}[{p.pid}]")
            p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return named


def _running_up(pidfile: Path) -> int | None:
    """The pid recorded in ``pidfile`` when that process still runs (the same start time: not a reused pid)."""
    import psutil

    try:
        record = json.loads(pidfile.read_text())
        proc = psutil.Process(int(record["pid"]))
        return proc.pid if abs(proc.create_time() - float(record["created"])) < 0.01 else None
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def end_leftovers(home: Path) -> list[str] | None:
    """End what an earlier `up` of this home left running when it was killed (SIGKILL, the OOM killer): every
    process carrying ``OWNER_ENV`` for this home. HAProxy is the one that matters: Ray Serve does not tie it to
    its manager actor, so it can outlive a killed `up` for ever with the data port bound, and Serve then cannot
    start again. Returns them as ``name[pid]``; None, touching nothing, while that earlier `up` still runs."""
    import psutil

    running = _running_up(home / PIDFILE)
    if running is not None:
        log.warning("enginehouse up %d still runs on %s: its processes are left alone", running, home)
        return None
    owner, me = str(home.resolve()), os.getpid()
    found, named = [], []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.pid != me and proc.environ().get(OWNER_ENV) == owner:
                named.append(f"{proc.name()}[{proc.pid}]")
                proc.kill()
                found.append(proc)
    psutil.wait_procs(found, timeout=10)
    return named


class RayWatch:
    """Watches the embedded Ray's GCS server and raylet from `up`; when either dies, `up` exits at once with
    ``EXIT_RAY_DIED`` and a log line that says which one, after ending every process the dead cluster left.

    Without it the control plane stays in a half state: a dead raylet leaves the reconciler blocked for ever
    in a call to the dead Serve controller (status frozen, counts no longer committed) and SIGTERM then hangs
    on that thread; a dead GCS makes Ray end the process after 60 s; either way the replicas' HAProxy is left
    holding the data port, so a restarted `up` cannot start Serve.
    """

    def __init__(self, every_s: float = 0.5, on_death: Callable[[], None] | None = None) -> None:
        from ray._private import worker

        node: Any = worker._global_node  # typed None in Ray's module
        self.procs = {name: node.all_processes[name][0].process for name in ("gcs_server", "raylet")}
        self.every_s = every_s
        self.on_death = on_death  # e.g. stop accepting API calls
        self.dead = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-watch", daemon=True)

    def start(self) -> RayWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Disarm before stopping Ray on purpose; once Ray died, wait here for the watch to end the process."""
        self._stop.set()
        if self.dead.is_set():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None and not self._stop.is_set():
                    self.dead.set()
                    self._died(f"its {name} (pid {proc.pid}) exited with status {code}")
                    return

    def _died(self, what: str) -> None:
        log.error(
            "the embedded Ray died: %s; enginehouse up exits with status %d. Start it again: its services come "
            "back from the registry, accepted async requests are kept",
            what,
            EXIT_RAY_DIED,
        )
        if self.on_death is not None:
            self.on_death()
        ended = end_descendants(signal.SIGKILL)  # the cluster is gone: nothing to drain
        log.error("ended %d processes of the dead Ray cluster: %s", len(ended), ", ".join(ended))
        logging.shutdown()
        # threads blocked in calls to the dead cluster never return: a normal exit would wait for them
        os._exit(EXIT_RAY_DIED)


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
    pidfile = None  # ours to remove at the end
    if not settings.address:
        import psutil  # Ray vendors it (ray/thirdparty_files)

        _become_subreaper()
        left = end_leftovers(settings.home)
        if left:
            log.warning("ended %d processes an earlier, killed enginehouse up left: %s", len(left), ", ".join(left))
        os.environ[OWNER_ENV] = str(settings.home.resolve())
        if left is not None:  # not while another `up` of this home runs: its record stays
            settings.home.mkdir(parents=True, exist_ok=True)
            pidfile = settings.home / PIDFILE
            pidfile.write_text(json.dumps({"pid": os.getpid(), "created": psutil.Process().create_time()}))
    start_ray(settings)
    watch = None if settings.address else RayWatch().start()
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
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
        if watch is not None:
            watch.on_death = lambda: setattr(server, "should_exit", True)
        server.run()
        if not server.started:  # as uvicorn.run: the control-plane port could not be bound
            raise SystemExit(3)
    finally:
        if watch is not None:
            watch.stop()
        if settings.address:  # a joined cluster is not ours to stop: remove only our applications
            from serving.dataplane import deploy as serve_apps

            serve_apps.sync({})
        # the embedded Ray takes its Serve actors down with it (serve.shutdown() first waits 30 s here)
        ray.shutdown()
        if not settings.address:  # what Ray's shutdown missed (an orphaned HAProxy, a custom engine's server)
            left = end_descendants(wait_first_s=5.0)  # Serve's actors and HAProxy go by themselves in 1-3 s
            if left:
                log.warning("ended %d processes left after Ray's shutdown: %s", len(left), ", ".join(left))
            if pidfile is not None:
                pidfile.unlink(missing_ok=True)
        registry.close()
    return 0
