#!/usr/bin/env python3
"""Soak: steady open-loop load on `enginehouse up` for a long time; no errors, no process growing.

Run from the repository root with the project's venv (see benchmarks/README.md, "Soak"):

    .venv/bin/python benchmarks/soak.py                    # 30 minutes at 0.7 x the measured capacity
    .venv/bin/python benchmarks/soak.py --minutes 2        # a quick check
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8080 --rps 500   # a running `up`, a given rate

What it does:

1. starts `enginehouse up` as a subprocess (free loopback ports, its own ENGINEHOUSE_HOME and RAY_TMPDIR in a
   temp dir, ``--num-cpus 2``, a model repository holding only ``mlp-onnx``, built by code), or uses the `up`
   whose control plane is ``--url``; waits until the ``mlp-onnx`` service (``--service``) is running and checks
   one answer against the numpy reference;
2. capacity: a closed loop of ``--capacity-clients`` (32) clients for ``--capacity-seconds`` (20 s), unless
   ``--rps`` gives the rate;
3. an open loop at ``--fraction`` (0.7) of that capacity for ``--minutes`` (30): requests leave on a fixed
   schedule whether or not earlier ones were answered (at most ``--max-in-flight`` outstanding; one more is
   an error), each ``POST {access_address}`` with ``{"instances": [[1, 2, 3, 4]]}`` and a 10 s timeout. Every
   ``--every`` (30) s it prints the elapsed time, requests, errors, p50 and p99 of that window, the load
   generator's own CPU, the load average and the RSS of the whole server tree;
4. memory: the resident set (RSS) of every process of the `up` process tree, named (control plane, raylet,
   GCS, Serve controller, proxy, HAProxy, replicas, ...), at the start of the load, after the warm-up
   (``--warmup``, 60 s: the baseline; what grows while caches, pools and the allocator settle is excluded) and
   at the end, with the growth from the baseline in %.

Exit status 1 when any request failed (capacity or soak), when any process grew more than ``--max-growth``
(5 %) from the baseline (and by more than ``--min-growth-mb``, 1 MB: HAProxy's 13 MB move by 0.7 MB as its
connection pools fill; ``--min-growth-mb 0`` for the bare 5 % rule), or when a process of the tree died during
the soak (Ray's idle workers aside); 0 otherwise. The load generator is one process (asyncio, aiohttp with a
keep-alive pool; uvloop when installed) sharing the machine with the server, so its CPU is printed per window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # models.* (run as a script from anywhere)
    sys.path.insert(0, str(ROOT))

SERVICE = "mlp-onnx"
ROW = [1.0, 2.0, 3.0, 4.0]
BODY = json.dumps({"instances": [ROW]}).encode()
HEADERS = {"content-type": "application/json"}
MB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1000) if len(values) else float("nan")


# -- enginehouse up ----------------------------------------------------------------------------------------
@dataclass
class Server:
    cp_url: str
    pid: int | None  # the `up` process, when found (its tree is measured)
    proc: subprocess.Popen[bytes] | None = None  # when this script started it
    logfile: Path | None = None


def start_up(tmp: Path, args: argparse.Namespace) -> Server:
    from models.build import build_onnx

    build_onnx(tmp / "repo" / SERVICE / "1.0.0")
    port, data_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}  # never someone's cluster
    env.update(
        ENGINEHOUSE_HOME=str(tmp / "home"),
        RAY_TMPDIR=str(tmp / "ray"),  # short: Ray's unix sockets live under it
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # fixed default ports of HAProxy's stats/metrics and Serve's fallback proxy: moved, so that this `up`
        # runs beside any other Serve on the machine
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
        RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
        RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()),
    )
    env.update(dict(kv.split("=", 1) for kv in args.eh_env))
    exe = Path(sys.executable).parent / "enginehouse"
    cmd = [*([str(exe)] if exe.exists() else [sys.executable, "-m", "serving.cli"]), "up"]
    cmd += ["--port", str(port), "--data-port", str(data_port), "--model-repository", str(tmp / "repo")]
    cmd += ["--num-cpus", str(args.num_cpus)]
    logfile = tmp / "enginehouse.log"
    log(f"starting {' '.join(cmd)}  [log {logfile}]")
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc.pid, proc, logfile)


def stop_up(server: Server) -> None:
    """SIGTERM our `up`, then end whatever is left of its session (everything it started stays in it)."""
    proc = server.proc
    if proc is None:
        return
    if proc.poll() is None:
        log(f"stopping enginehouse up (SIGTERM to {proc.pid})")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            log("still running after 60 s: SIGKILL")
            proc.kill()
            proc.wait(10)
    left = [p for p in session(proc.pid) if p.pid != proc.pid]
    if left:
        log(f"ending {len(left)} processes left in its session: {[p.pid for p in left]}")
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
    log(f"enginehouse up exited with {proc.returncode}")


def session(sid: int) -> list[psutil.Process]:
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return out


def tail(path: Path | None, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


def wait_service(server: Server, name: str, timeout_s: float) -> dict[str, Any]:
    import httpx

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise SystemExit(f"enginehouse up exited with {server.proc.returncode}:\n{tail(server.logfile)}")
        try:
            r = httpx.get(f"{server.cp_url}/v1/default/services", params={"service_name": name}, timeout=5)
            found = [s for s in r.json().get("services", []) if s.get("service_name") == name]
            last = found[0]["status"] if found else "not there"
            if found and last == "failed":
                raise SystemExit(f"service {name} failed: {found[0].get('error_msg')}")
            if found and last == "running":
                return dict(found[0])
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise SystemExit(f"service {name} not running after {timeout_s:.0f} s (last: {last})\n{tail(server.logfile)}")


def up_pid_of(cp_url: str) -> int | None:
    """The pid listening on the control plane's port (this machine only)."""
    port = int(cp_url.rstrip("/").rsplit(":", 1)[1])
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except psutil.AccessDenied:
        pass
    return None


# -- memory of the process tree ----------------------------------------------------------------------------
ROLES = (  # (start of the command line's first word, role)
    ("raylet", "raylet"),
    ("gcs_server", "GCS"),
    ("ray::ServeController", "Serve controller"),
    ("ray::ProxyActor", "Serve proxy (fallback)"),
    ("ray::HAProxyManager", "HAProxy manager"),
    ("haproxy", "HAProxy"),
    ("ray::ServeReplica:enginehouse-v2:", "gateway replica"),
    ("ray::CounterSink", "counter sink"),
    ("ray::DashboardAgent", "dashboard agent"),
    ("ray::RuntimeEnvAgent", "runtime-env agent"),
    ("ray::IDLE", "idle worker"),
)
SCRIPTS = {"dashboard.py": "dashboard (minimal)", "monitor.py": "autoscaler monitor", "log_monitor.py": "log monitor"}


def role(p: psutil.Process, up_pid: int, services: dict[str, str]) -> str:
    if p.pid == up_pid:
        return "control plane (up)"
    cmd = p.cmdline()
    first = cmd[0].rsplit("/", 1)[-1] if cmd else p.name()
    if first.startswith("ray::ServeReplica:"):  # ray::ServeReplica:<application>:<deployment>
        app = first.removeprefix("ray::ServeReplica:").split(":")[0]
        if app in services:
            return f"replica of {services[app]}"
    for prefix, name in ROLES:
        if first.startswith(prefix):
            return name
    for word in cmd[1:3]:
        script = word.rsplit("/", 1)[-1]
        if script in SCRIPTS:
            return SCRIPTS[script]
    return first[:40]


Snapshot = dict[int, tuple[str, int]]  # pid -> (role, rss bytes)


def snapshot(up_pid: int | None, services: dict[str, str]) -> Snapshot:
    if up_pid is None:
        return {}
    try:
        top = psutil.Process(up_pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: Snapshot = {}
    for p in procs:
        try:
            out[p.pid] = (role(p, up_pid, services), p.memory_info().rss)
        except psutil.Error:
            continue
    return out


def memory_table(
    idle: Snapshot, base: Snapshot, end: Snapshot, max_growth: float, min_mb: float
) -> tuple[list[str], list[str]]:
    """The table's lines, and the problems (growth over the limit, processes gone)."""
    lines = [f"{'process':<34}{'pid':>8}{'start MB':>10}{'baseline MB':>13}{'end MB':>9}{'growth':>9}"]
    problems: list[str] = []
    for pid in sorted(set(base) | set(end), key=lambda p: (base.get(p) or end[p])[0]):
        name = (base.get(pid) or end[pid])[0]
        start = f"{idle[pid][1] / MB:.1f}" if pid in idle else "-"
        if pid not in end:
            lines.append(f"{name:<34}{pid:>8}{start:>10}{base[pid][1] / MB:>13.1f}{'gone':>9}{'':>9}")
            if name != "idle worker":
                problems.append(f"{name} [{pid}] died during the soak")
            continue
        if pid not in base:
            lines.append(f"{name:<34}{pid:>8}{start:>10}{'new':>13}{end[pid][1] / MB:>9.1f}{'':>9}")
            continue
        growth = 100.0 * (end[pid][1] - base[pid][1]) / max(base[pid][1], 1)
        over = growth > max_growth and (end[pid][1] - base[pid][1]) / MB > min_mb
        flag = "  <-- over the limit" if over else ""
        lines.append(
            f"{name:<34}{pid:>8}{start:>10}{base[pid][1] / MB:>13.1f}{end[pid][1] / MB:>9.1f}{growth:>+8.1f}%{flag}"
        )
        if over:
            problems.append(f"{name} [{pid}] grew {growth:+.1f} % (limit {max_growth:g} % and {min_mb:g} MB)")
    total_b = sum(v[1] for v in base.values()) / MB
    total_e = sum(v[1] for v in end.values()) / MB
    lines.append(f"{'all':<34}{'':>8}{'':>10}{total_b:>13.1f}{total_e:>9.1f}")
    return lines, problems


# -- load ----------------------------------------------------------------------------------------------------
Post = Callable[[], Awaitable[tuple[int, bytes]]]


Errors = tuple[type[BaseException], ...]


async def make_client(url: str, pool: int, kind: str) -> tuple[Post, Callable[[], Awaitable[None]], Errors]:
    if kind == "aiohttp":
        import aiohttp

        session_ = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool),
            timeout=aiohttp.ClientTimeout(total=10),
            skip_auto_headers=("User-Agent",),
        )

        async def post() -> tuple[int, bytes]:
            async with session_.post(url, data=BODY, headers=HEADERS) as r:
                return r.status, await r.read()

        return post, session_.close, (aiohttp.ClientError, asyncio.TimeoutError, OSError)
    import httpx

    hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool), timeout=10)

    async def post_hx() -> tuple[int, bytes]:
        r = await hx.post(url, content=BODY, headers=HEADERS)
        return r.status_code, r.content

    return post_hx, hx.aclose, (httpx.HTTPError, OSError)


@dataclass
class Window:
    lat: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def fail(self, why: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or why


async def call(post: Post, exc_types: Errors, w: Window) -> None:
    t0 = time.perf_counter()
    try:
        status, content = await post()
    except exc_types as exc:
        w.fail(f"{type(exc).__name__}: {exc}")
        return
    if status != 200:
        w.fail(f"HTTP {status}: {content[:200]!r}")
        return
    w.lat.append(time.perf_counter() - t0)


async def closed_loop(url: str, clients: int, seconds: float, kind: str) -> tuple[float, Window]:
    post, close, exc_types = await make_client(url, clients, kind)
    w = Window()
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            before = w.errors
            await call(post, exc_types, w)
            if w.errors > before:
                await asyncio.sleep(0.01)  # no hot loop against a failing server

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await close()
    return len(w.lat) / (time.perf_counter() - t0), w


async def open_loop(
    url: str,
    rps: float,
    seconds: float,
    args: argparse.Namespace,
    on_warm: Callable[[], None],
    alive: Callable[[], bool],
    rss_mb: Callable[[], float],
) -> tuple[int, int, np.ndarray, str]:
    """Requests on a fixed schedule; returns (requests, errors, latencies after the warm-up, first error)."""
    post, close, exc_types = await make_client(url, args.pool, args.client)
    tasks: set[asyncio.Task[None]] = set()
    windows: list[np.ndarray] = []
    w, total, errors, first_error = Window(), 0, 0, ""
    t0 = time.perf_counter()
    sent, warm, next_report = 0, False, args.every
    cpu0, w_start = cpu_s(), t0
    try:
        while (now := time.perf_counter()) - t0 < seconds:
            due = int((now - t0) * rps) - sent
            for _ in range(due):
                if len(tasks) >= args.max_in_flight:
                    w.fail(f"client: {args.max_in_flight} requests outstanding (the server stopped answering?)")
                else:
                    task = asyncio.get_running_loop().create_task(call(post, exc_types, w))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            sent += max(due, 0)
            if not warm and now - t0 >= args.warmup:
                warm = True
                on_warm()
            if now - t0 >= next_report:
                lat = np.asarray(w.lat, dtype=np.float64)
                n = len(lat) + w.errors
                span = now - w_start
                cpu1 = cpu_s()
                log(
                    f"{now - t0:6.0f} s  requests {n:>8,} ({n / span:,.0f}/s)  errors {w.errors}  "
                    f"p50 {pct(lat, 50):6.2f} ms  p99 {pct(lat, 99):6.2f} ms  client cpu {(cpu1 - cpu0) / span:.2f} "
                    f"cores  load {os.getloadavg()[0]:.1f}  server rss {rss_mb():,.0f} MB"
                    + (f"  first error: {w.first_error}" if w.errors else "")
                )
                total, errors = total + n, errors + w.errors
                first_error = first_error or w.first_error
                if warm:
                    windows.append(lat)
                w, cpu0, w_start, next_report = Window(), cpu1, now, next_report + args.every
                if not alive():
                    raise SystemExit("enginehouse up is gone")
            await asyncio.sleep(0.005)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    finally:
        await close()
    lat = np.asarray(w.lat, dtype=np.float64)
    total, errors = total + len(lat) + w.errors, errors + w.errors
    first_error = first_error or w.first_error
    if warm:
        windows.append(lat)
    return total, errors, np.concatenate(windows) if windows else np.zeros(0), first_error


def run_async(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


# -- main ----------------------------------------------------------------------------------------------------
def soak(args: argparse.Namespace, server: Server) -> int:
    import httpx

    from models.mlp_weights import mlp_reference

    svc = wait_service(server, args.service, args.start_timeout)
    url = svc["access_address"]
    r = httpx.post(url, content=BODY, headers=HEADERS, timeout=30)
    want = mlp_reference(np.array([ROW], np.float32))
    if r.status_code != 200 or not np.allclose(r.json()["predictions"], want, atol=1e-4):
        raise SystemExit(f"wrong answer from {url}: {r.status_code} {r.text[:300]}")
    log(f"service {args.service} ({svc['service_id']}) running at {url}; the answer matches the numpy reference")
    services = {svc["service_id"]: args.service}
    if server.pid is None:
        log("the `up` process is not on this machine (or not found): memory is not measured")
    failed = False

    if args.rps:
        rps = args.rps
        log(f"open loop at the given {rps:,.0f} requests/s")
    else:
        log(f"capacity: closed loop, {args.capacity_clients} clients, {args.capacity_seconds:g} s")
        capacity, w = run_async(closed_loop(url, args.capacity_clients, args.capacity_seconds, args.client))
        lat = np.asarray(w.lat)
        log(
            f"capacity {capacity:,.0f} requests/s  p50 {pct(lat, 50):.2f} ms  p99 {pct(lat, 99):.2f} ms  "
            f"errors {w.errors}" + (f"  first error: {w.first_error}" if w.errors else "")
        )
        failed |= w.errors > 0
        rps = capacity * args.fraction
        log(f"open loop at {args.fraction:g} x capacity = {rps:,.0f} requests/s")

    idle = snapshot(server.pid, services)
    base: Snapshot = {}
    seconds = args.minutes * 60

    def on_warm() -> None:
        base.update(snapshot(server.pid, services))
        log(f"warm-up of {args.warmup:g} s over: memory baseline taken ({len(base)} processes)")

    log(f"soak: {args.minutes:g} min, report every {args.every:g} s, memory baseline after {args.warmup:g} s")
    t0 = time.monotonic()
    total, errors, lat, first_error = run_async(
        open_loop(
            url,
            rps,
            seconds,
            args,
            on_warm,
            lambda: server.proc is None or server.proc.poll() is None,
            lambda: sum(rss for _, rss in snapshot(server.pid, services).values()) / MB,
        )
    )
    end = snapshot(server.pid, services)
    took = time.monotonic() - t0
    log(
        f"soak done: {total:,} requests in {took:.0f} s ({total / took:,.0f}/s), errors {errors}; after the warm-up "
        f"p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, p99.9 {pct(lat, 99.9):.2f} ms"
        + (f"; first error: {first_error}" if errors else "")
    )
    problems = [f"{errors} requests failed"] if errors else []
    if failed:
        problems.append("requests failed while measuring the capacity")
    if server.pid is not None:
        lines, grown = memory_table(idle, base, end, args.max_growth, args.min_growth_mb)
        log(
            f"resident memory (RSS) of the `up` process tree: start of the load, baseline after the "
            f"{args.warmup:g} s warm-up, end; growth from the baseline (limit {args.max_growth:g} %, counted when "
            f"over {args.min_growth_mb:g} MB too)"
        )
        for line in lines:
            print(f"    {line}", flush=True)
        problems += grown
    if problems:
        log("FAIL: " + "; ".join(problems))
        return 1
    log(f"PASS: no errors, no process grew more than {args.max_growth:g} % after the warm-up")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="control plane of a running `up` (default: start one)")
    ap.add_argument("--service", default=SERVICE, help=f"service to load (default {SERVICE})")
    ap.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    ap.add_argument("--fraction", type=float, default=0.7, help="fraction of the capacity to send (default 0.7)")
    ap.add_argument("--rps", type=float, help="send this rate instead of measuring the capacity")
    ap.add_argument("--capacity-clients", type=int, default=32)
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline (default 60)")
    ap.add_argument("--every", type=float, default=30.0, help="report interval in seconds (default 30)")
    ap.add_argument("--max-growth", type=float, default=5.0, help="max RSS growth per process in %% (default 5)")
    ap.add_argument(
        "--min-growth-mb",
        type=float,
        default=1.0,
        help="growth under this many MB never fails (HAProxy's 13 MB move by 0.7 MB with its connection pools)",
    )
    ap.add_argument("--max-in-flight", type=int, default=1000, help="outstanding requests before one is an error")
    ap.add_argument("--pool", type=int, default=256, help="keep-alive connections of the open loop (default 256)")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (default 2)")
    ap.add_argument("--eh-env", action="append", default=[], help="KEY=VALUE for the started `up` (repeatable)")
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (the server's log)")
    args = ap.parse_args(argv)
    if args.minutes * 60 <= args.warmup:
        ap.error(f"--minutes {args.minutes:g} leaves nothing after the {args.warmup:g} s warm-up")
    if any("=" not in kv for kv in args.eh_env):
        ap.error("--eh-env takes KEY=VALUE")
    log(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    if args.url:
        server = Server(args.url.rstrip("/"), up_pid_of(args.url))
        return soak(args, server)
    tmp = Path(tempfile.mkdtemp(prefix="ehsoak-", dir="/tmp"))  # short: Ray's socket paths
    server = start_up(tmp, args)
    try:
        return soak(args, server)
    finally:
        stop_up(server)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
