#!/usr/bin/env python3
"""Data-plane benchmark: the engine in-process vs Enginehouse vs MLServer, on this machine, in one go.

Run from the repository root with the project's venv (see benchmarks/README.md):

    .venv/bin/python benchmarks/dataplane.py                     # everything, about 2.5 minutes
    .venv/bin/python benchmarks/dataplane.py --replica-cpus 1,2  # Enginehouse at two CPU settings, about 3.5 minutes
    .venv/bin/python benchmarks/dataplane.py --duration 5 --skip-mlserver

What it does:

1. builds an ONNX MLP 256 -> 1024 -> 1024 -> 10 fp32 (input ``x`` [-1, 256], output ``y`` [-1, 10]) by code, with
   weights from ``numpy.random.default_rng(0)``, into a temporary model repository as two versions,
   ``mlp/1.0.0`` and ``mlp/2.0.0`` (nothing is downloaded);
2. in-process: an onnxruntime session of that file with the replica's thread budget; 1 client = sequential
   1x256 calls, 32 clients = batches of 32 rows back to back (reported as rows/s);
3. Enginehouse: ``enginehouse up`` as a subprocess (free ports on 127.0.0.1, its own ENGINEHOUSE_HOME and
   Ray temp dir, ``--num-cpus 2``, ``ENGINEHOUSE_REPLICA_CPUS``), which deploys the two versions as one
   service at 50/50; ``POST /v1/infers/{id}`` with 1x256 fp32 requests as OIP v2 JSON and with the binary
   tensor extension (binary answer too), at 1 and 32 concurrent clients; stopped with SIGTERM;
4. MLServer (its own venv, ``benchmarks/.venv-mlserver``, created on first use) with the custom runtime in
   ``benchmarks/mlserver_onnx/`` on the same file, adaptive batching on (max_batch_size 32), the same requests
   to ``/v2/models/mlp/infer``.

The load generator is this one process: asyncio (uvloop when installed), one keep-alive connection per
client, closed loop (each client sends its next request when the answer is in), a warm-up, then a fixed
measured window in which every latency is recorded. It shares the 2 cores with the server under test, so
its own CPU use is printed per point (``client cpu``, in cores), next to the CPU of the server's whole process
tree (``server cpu``, and CPU milliseconds per answered request). aiohttp is the default client: httpx's
AsyncClient spent 0.80 cores for 309 rps at 32 clients here, aiohttp 0.21 cores for 1,677 rps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IN, HIDDEN, OUT = 256, 1024, 10
INPUT, OUTPUT = "x", "y"
SERVICE = "mlp"
VERSIONS = ("1.0.0", "2.0.0")
MLSERVER_VENV = HERE / ".venv-mlserver"
MLSERVER_TEMPLATE = HERE / "mlserver_onnx"
TARGET_RATIO, TARGET_P50_MS = 1.3, 3.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the model ----------------------------------------------------------------------------------------------


def mlp_weights() -> dict[str, np.ndarray]:
    """Deterministic weights (He-scaled normals from default_rng(0)), float32."""
    rng = np.random.default_rng(0)
    dims = [(IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, OUT)]
    w: dict[str, np.ndarray] = {}
    for i, (a, b) in enumerate(dims, 1):
        w[f"w{i}"] = (rng.standard_normal((a, b)) * math.sqrt(2.0 / a)).astype(np.float32)
        w[f"b{i}"] = (rng.standard_normal(b) * 0.01).astype(np.float32)
    return w


def mlp_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    h = np.maximum(x @ w["w1"] + w["b1"], 0.0)
    h = np.maximum(h @ w["w2"] + w["b2"], 0.0)
    return (h @ w["w3"] + w["b3"]).astype(np.float32)


def build_onnx(path: Path, w: dict[str, np.ndarray]) -> Path:
    """The MLP as an ONNX file, built with onnx.helper (opset 17, IR 8, a symbolic batch dimension)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", [INPUT, "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["m3"]),
        helper.make_node("Add", ["m3", "b3"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp_256_1024_1024_10",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", OUT])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in w.items()],
    )
    model = helper.make_model(graph, producer_name="enginehouse-bench", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def build_repository(repo: Path, w: dict[str, np.ndarray]) -> Path:
    """``repo/mlp/{1.0.0,2.0.0}/`` with the same model file; returns the file of the first version."""
    first = None
    for version in VERSIONS:
        vdir = repo / SERVICE / version
        model = build_onnx(vdir / "model.onnx", w)
        (vdir / "config.json").write_text(json.dumps({"engine": "ONNX", "model_file": "model.onnx"}) + "\n")
        first = first or model
    assert first is not None
    return first


# -- requests -----------------------------------------------------------------------------------------------


def json_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """(body, json header length) of an OIP v2 binary-extension request asking for a binary answer."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + raw, len(header)


@dataclass
class Payloads:
    """A few distinct 1x256 inputs, their bodies in both formats and the expected outputs."""

    xs: list[np.ndarray]
    expected: list[np.ndarray]
    json_bodies: list[bytes] = field(default_factory=list)
    binary_bodies: list[bytes] = field(default_factory=list)
    binary_header_lengths: list[int] = field(default_factory=list)

    @classmethod
    def make(cls, w: dict[str, np.ndarray], n: int = 16) -> Payloads:
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((1, IN)).astype(np.float32) for _ in range(n)]
        p = cls(xs, [mlp_reference(x, w) for x in xs])
        p.json_bodies = [json_body(x) for x in xs]
        for x in xs:
            body, hl = binary_body(x)
            p.binary_bodies.append(body)
            p.binary_header_lengths.append(hl)
        return p

    def requests(self, fmt: str) -> list[tuple[bytes, dict[str, str]]]:
        if fmt == "json":
            return [(b, {"content-type": "application/json"}) for b in self.json_bodies]
        return [
            (b, {"content-type": "application/octet-stream", "inference-header-content-length": str(hl)})
            for b, hl in zip(self.binary_bodies, self.binary_header_lengths, strict=True)
        ]


def decode_answer(body: bytes, headers: Any) -> np.ndarray:
    """The output ``y`` of an OIP v2 answer, JSON or binary extension."""
    hl = headers.get("inference-header-content-length")
    if hl is None:
        out = json.loads(body)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    hl = int(hl)
    header = json.loads(body[:hl])
    out = header["outputs"][0]
    size = out["parameters"]["binary_data_size"]
    return np.frombuffer(body[hl : hl + size], dtype="<f4").reshape(out["shape"])


# -- measurement --------------------------------------------------------------------------------------------


@dataclass
class Point:
    system: str
    clients: int
    duration_s: float
    count: int  # completed requests (or engine calls) in the measured window
    errors: int
    rows_per_call: int = 1
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    client_cpu: float = float("nan")  # cores used by this process during the window
    server_cpu: float = float("nan")  # cores used by the server's whole process tree during the window
    first_error: str = ""

    @property
    def rps(self) -> float:
        """Requests/s, or rows/s for the in-process batched point."""
        return self.count * self.rows_per_call / self.duration_s if self.duration_s else 0.0

    @property
    def server_ms_per_request(self) -> float:
        """CPU milliseconds the server's processes spent per answered request."""
        return self.server_cpu * 1000.0 / self.rps if self.rps else float("nan")

    def line(self) -> str:
        unit = "rows/s" if self.rows_per_call > 1 else "rps"
        cpu = "" if math.isnan(self.client_cpu) else f"  client cpu {self.client_cpu:.2f}"
        if not math.isnan(self.server_cpu):
            cpu += f"  server cpu {self.server_cpu:.2f} ({self.server_ms_per_request:.2f} ms/req)"
        err = f"  ({self.first_error})" if self.first_error else ""
        err += f"  load {os.getloadavg()[0]:.1f}"
        return (
            f"{self.system:<22} c={self.clients:<3} {unit} {self.rps:8.1f}  p50 {self.p50_ms:6.2f} ms  "
            f"p99 {self.p99_ms:6.2f} ms  errors {self.errors}{cpu}{err}"
        )


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_HZ = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it, read from /proc."""
    if root is None:
        return float("nan")
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, t in ticks.items():
        p, seen = pid, 0
        while p and p != root and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p == root:
            total += t
    return total / _HZ


def _finish(point: Point, lat: list[float]) -> Point:
    if lat:
        a = np.asarray(lat) * 1000.0
        point.p50_ms, point.p99_ms = float(np.percentile(a, 50)), float(np.percentile(a, 99))
    log(point.line())
    return point


def bench_inprocess(model: Path, threads: int, clients: int, warmup: float, duration: float) -> Point:
    """The engine alone: 1 client = sequential 1-row calls; N clients = N-row batches back to back."""
    import onnxruntime as ort

    opts = ort.SessionOptions()  # the same options as runtimes/onnx.py gives a replica
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((clients, IN)).astype(np.float32)
    feeds = {INPUT: x}
    end_warm = time.perf_counter() + warmup
    while time.perf_counter() < end_warm:
        sess.run([OUTPUT], feeds)
    lat: list[float] = []
    cpu0, t_start = _cpu_s(), time.perf_counter()
    end = t_start + duration
    t0 = t_start
    while t0 < end:
        sess.run([OUTPUT], feeds)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        t0 = t1
    elapsed = t0 - t_start
    point = Point("in-process", clients, elapsed, len(lat), 0, rows_per_call=clients)
    point.client_cpu = (_cpu_s() - cpu0) / elapsed
    del sess
    return _finish(point, lat)


async def _load(
    system: str,
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    clients: int,
    warmup: float,
    duration: float,
    client_lib: str,
    server_pid: int | None = None,
) -> Point:
    lat: list[float] = []
    errors = 0
    first_error = ""
    # perf_counter, not loop.time(): uvloop's clock has a 1 ms resolution
    now = time.perf_counter
    t_start = now() + warmup
    t_end = t_start + duration
    n = len(requests)

    if client_lib == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients, force_close=False),
            timeout=aiohttp.ClientTimeout(total=60),
            skip_auto_headers=("User-Agent",),
        )

        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()

        close = session.close
        exc_types: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
    else:
        import httpx

        hx = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
            timeout=httpx.Timeout(60.0),
        )

        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
            r = await hx.post(url, content=body, headers=headers)
            return r.status_code, r.content

        close = hx.aclose
        exc_types = (httpx.HTTPError, OSError)

    async def worker(i: int) -> None:
        nonlocal errors, first_error
        k = i
        while True:
            t0 = now()
            if t0 >= t_end:
                return
            body, headers = requests[k % n]
            k += 1
            try:
                status, content = await post(body, headers)
                ok = status == 200
                why = "" if ok else f"HTTP {status}: {content[:200]!r}"
            except exc_types as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            t1 = now()
            if t0 >= t_start and t1 <= t_end:
                if ok:
                    lat.append(t1 - t0)
                else:
                    errors += 1
            if not ok:
                first_error = first_error or why
                await asyncio.sleep(0.01)  # no hot loop against a failing server

    cpu: list[float] = []
    server: list[float] = []

    async def cpu_meter() -> None:
        await asyncio.sleep(max(0.0, t_start - now()))
        cpu.append(_cpu_s())
        server.append(tree_cpu_s(server_pid))
        await asyncio.sleep(max(0.0, t_end - now()))
        cpu.append(_cpu_s())
        server.append(tree_cpu_s(server_pid))

    try:
        await asyncio.gather(cpu_meter(), *(worker(i) for i in range(clients)))
    finally:
        await close()
    point = Point(system, clients, duration, len(lat), errors, first_error=first_error)
    point.client_cpu = (cpu[1] - cpu[0]) / duration
    point.server_cpu = (server[1] - server[0]) / duration
    return _finish(point, lat)


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def load(
    system: str,
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    clients: int,
    args: Any,
    server_pid: int | None = None,
) -> Point:
    return run_async(_load(system, url, requests, clients, args.warmup, args.duration, args.client, server_pid))


def check_answers(system: str, url: str, payloads: Payloads, fmt: str) -> str | None:
    """Send each distinct request once; None when every answer matches the reference, else what went wrong."""
    import httpx

    with httpx.Client(timeout=30) as c:
        for (body, headers), want in zip(payloads.requests(fmt), payloads.expected, strict=True):
            r = c.post(url, content=body, headers=headers)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:300]}"
            try:
                got = decode_answer(r.content, r.headers)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return f"unreadable answer ({exc}): {r.content[:200]!r}"
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
                return f"wrong answer: max abs diff {float(np.max(np.abs(got - want))):.3g}"
    log(f"{system} {fmt}: answers match the numpy reference")
    return None


# -- processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes], name: str, grace: float = 60.0) -> None:
    """SIGTERM our child, wait, then clean up whatever is left of its process group (all started by us)."""
    if proc.poll() is None:
        log(f"stopping {name} (SIGTERM to pid {proc.pid})")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{name} still running after {grace:.0f} s: SIGKILL to its process group {proc.pid}")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # the child ran in its own session (start_new_session), so its process group holds only what it started
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        log(f"{name}: leftover processes in group {proc.pid}, sending {sig.name}")
        os.killpg(proc.pid, sig)
        time.sleep(wait)


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], logfile: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail(logfile)}")
        try:
            result = check()
        except Exception as exc:  # not up yet
            result, state = None, f"{type(exc).__name__}"
        else:
            state = "ready" if result else "not ready"
        if result:
            return result
        if state != last:
            last = state
        time.sleep(1.0)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{tail(logfile)}")


def enginehouse_command() -> list[str]:
    exe = Path(sys.executable).parent / "enginehouse"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "serving.cli"]


def run_enginehouse(tmp: Path, repo: Path, payloads: Payloads, replica_cpus: float, args: Any) -> list[Point]:
    import httpx

    cp, dp = free_port(), free_port()
    home = tmp / f"home-{replica_cpus:g}"
    home.mkdir()
    logfile = tmp / f"enginehouse-{replica_cpus:g}.log"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always an embedded Ray, never someone's running cluster
    env.update(
        ENGINEHOUSE_HOME=str(home),
        ENGINEHOUSE_REPLICA_CPUS=str(replica_cpus),
        # Ray's files, sockets and "current cluster" pointer in our temp dir: nothing shared with other Ray users
        RAY_TMPDIR=str(tmp / "ray"),
    )
    env.update(dict(kv.split("=", 1) for kv in args.eh_env))
    cmd = [
        *enginehouse_command(),
        "up",
        "--port", str(cp),
        "--data-port", str(dp),
        "--model-repository", str(repo),
        "--num-cpus", str(args.num_cpus),
    ]  # fmt: skip
    log(f"starting Enginehouse (replica_cpus={replica_cpus:g}): {' '.join(cmd)}  [log {logfile}]")
    t0 = time.monotonic()
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    points: list[Point] = []
    try:
        base = f"http://127.0.0.1:{cp}"

        def running() -> dict[str, Any] | None:
            r = httpx.get(f"{base}/v1/default/services", params={"service_name": SERVICE}, timeout=5)
            for s in r.json().get("services", []):
                if s.get("service_name") == SERVICE:
                    if s.get("status") == "failed":
                        raise SystemExit(f"the service failed: {s.get('error_msg')}\n{tail(logfile)}")
                    return s if s.get("status") == "running" else None
            return None

        svc = wait_for("Enginehouse service", running, proc, logfile, args.start_timeout)
        if args.instances > 1:  # more replicas: one PUT of the config, as a user would scale a service
            config = [
                {k: c[k] for k in ("model_id", "weight", "specification", "custom_spec")}
                | {"instance_count": args.instances}
                for c in svc["config"]
            ]
            r = httpx.put(f"{base}/v1/default/services/{svc['service_id']}", json={"config": config}, timeout=30)
            r.raise_for_status()
            time.sleep(1)

            def scaled() -> dict[str, Any] | None:
                s = running()
                return s if s and s["config"][0]["instance_count"] == args.instances else None

            svc = wait_for("Enginehouse replicas", scaled, proc, logfile, args.start_timeout)
        url = svc["access_address"]
        log(f"service {svc.get('service_id')} running after {time.monotonic() - t0:.1f} s at {url}")
        label = "enginehouse" if len(args.replica_cpus) == 1 else f"enginehouse[{replica_cpus:g}cpu]"
        scraping = threading.Event()
        scrapes: list[float] = []
        if args.scrape_every:  # a Prometheus-like scraper of /metrics beside the load: does it cost throughput?
            label += f" scraped/{args.scrape_every:g}s"

            def scrape() -> None:
                with httpx.Client(timeout=10) as c:
                    while not scraping.wait(args.scrape_every):
                        t = time.perf_counter()
                        c.get(f"{base}/metrics").raise_for_status()
                        scrapes.append(time.perf_counter() - t)

            threading.Thread(target=scrape, daemon=True).start()
        for fmt in args.formats:
            problem = check_answers("Enginehouse", url, payloads, fmt)
            if problem:
                raise RuntimeError(f"Enginehouse {fmt}: {problem}")
            for clients in args.clients:
                points.append(load(f"{label} {fmt}", url, payloads.requests(fmt), clients, args, proc.pid))
        scraping.set()
        if scrapes:
            log(f"  /metrics scraped {len(scrapes)} times, median {sorted(scrapes)[len(scrapes) // 2] * 1000:.1f} ms")
        try:  # how the batcher and the 50/50 split behaved (Triton-style stats of the replica)
            stats = httpx.get(f"{url}/v2/models/{SERVICE}/stats", timeout=5).json()
            for m in stats.get("model_stats", []):
                calls = m.get("execution_count", 0)
                rows = m.get("inference_count", 0)
                log(
                    f"  version {m.get('version')}: {rows} rows in {calls} engine calls "
                    f"(mean batch {rows / max(calls, 1):.1f})"
                )
        except (httpx.HTTPError, ValueError):
            pass
    finally:
        stop(proc, "Enginehouse")
        log(f"Enginehouse stopped (exit {proc.returncode})")
    return points


# -- MLServer -----------------------------------------------------------------------------------------------


def ensure_mlserver_venv(venv: Path) -> Path:
    """``venv/bin/mlserver``; creates the venv with mlserver and our onnxruntime version on first use."""
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    from importlib import metadata

    ort_version = metadata.version("onnxruntime")
    base = getattr(sys, "_base_executable", sys.executable)
    log(f"creating {venv} with mlserver and onnxruntime=={ort_version} (one-time, a minute or two)")
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    # uvloop<0.22: with 0.22+ MLServer 1.7.1's parallel workers die at start (asyncio.get_event_loop() raises)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "mlserver", f"onnxruntime=={ort_version}", "numpy", "uvloop<0.22"], check=True)
    return exe


def run_mlserver(tmp: Path, model: Path, payloads: Payloads, threads: int, args: Any) -> tuple[list[Point], str]:
    """Returns the points and a note on the binary extension."""
    import httpx

    exe = ensure_mlserver_venv(Path(args.mlserver_venv))
    home = tmp / "mlserver"
    model_dir = home / SERVICE
    model_dir.mkdir(parents=True)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = json.loads((MLSERVER_TEMPLATE / "settings.json").read_text())
    settings.update(
        http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, parallel_workers=args.mlserver_workers
    )
    (home / "settings.json").write_text(json.dumps(settings, indent=2))
    ms = json.loads((MLSERVER_TEMPLATE / "model-settings.json").read_text())
    ms["max_batch_time"] = args.mlserver_batch_time_ms / 1000.0
    ms["parameters"]["extra"]["intra_op_num_threads"] = threads
    (model_dir / "model-settings.json").write_text(json.dumps(ms, indent=2))
    shutil.copy(model, model_dir / "model.onnx")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(MLSERVER_TEMPLATE)
    env.pop("VIRTUAL_ENV", None)
    logfile = tmp / "mlserver.log"
    cmd = [str(exe), "start", str(home)]
    log(
        f"starting MLServer (parallel_workers={args.mlserver_workers}, max_batch_size={ms['max_batch_size']}, "
        f"max_batch_time={ms['max_batch_time'] * 1000:g} ms, {threads} engine thread(s)): {' '.join(cmd)}"
    )
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    points: list[Point] = []
    note = ""
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_for(
            "MLServer",
            lambda: httpx.get(f"{base}/v2/models/{SERVICE}/ready", timeout=5).status_code == 200,
            proc,
            logfile,
            args.start_timeout,
        )
        url = f"{base}/v2/models/{SERVICE}/infer"
        log(f"MLServer ready at {url}")
        problem = check_answers("MLServer", url, payloads, "json")
        if problem:
            raise RuntimeError(f"MLServer json: {problem}")
        for clients in args.clients if "json" in args.formats else []:
            points.append(load("mlserver json", url, payloads.requests("json"), clients, args, proc.pid))
        problem = check_answers("MLServer", url, payloads, "binary") if "binary" in args.formats else None
        if "binary" not in args.formats:
            pass
        elif problem:
            note = f"MLServer {mlserver_version(exe)} does not take the binary tensor extension over REST: {problem}"
            log(note)
        else:
            for clients in args.clients:
                points.append(load("mlserver binary", url, payloads.requests("binary"), clients, args, proc.pid))
    finally:
        stop(proc, "MLServer", grace=30)
    return points, note


def mlserver_version(exe: Path) -> str:
    try:
        out = subprocess.run(
            [str(exe.parent / "python"), "-c", "import mlserver; print(mlserver.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# -- report -------------------------------------------------------------------------------------------------


def table(points: list[Point], clients: list[int]) -> str:
    systems: dict[str, dict[int, Point]] = {}
    for p in points:
        systems.setdefault(p.system, {})[p.clients] = p
    cols = ["system"]
    for c in clients:
        cols += [f"rps@{c}", f"p50@{c} ms", f"p99@{c} ms"]
    cols.append("errors")
    rows = [cols]
    for name, by_c in systems.items():
        row = [name]
        for c in clients:
            got = by_c.get(c)
            row += [f"{got.rps:,.0f}", f"{got.p50_ms:.2f}", f"{got.p99_ms:.2f}"] if got else ["-", "-", "-"]
        row.append(str(sum(p.errors for p in by_c.values())))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = []
    for k, r in enumerate(rows):
        lines.append(
            "| " + " | ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r)) + " |"
        )
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdicts(points: list[Point], clients: list[int]) -> list[str]:
    by = {(p.system, p.clients): p for p in points}
    hi, lo = max(clients), min(clients)
    out: list[str] = []
    peers = [p for p in points if p.system.startswith("mlserver") and p.clients == hi and p.count]
    best_peer = max(peers, key=lambda p: p.rps) if peers else None
    for p in points:
        if not p.system.startswith("enginehouse"):
            continue
        if p.clients == hi and best_peer:
            ratio = p.rps / best_peer.rps
            ok = "MET" if ratio >= TARGET_RATIO else "MISSED"
            out.append(
                f"{p.system} / {best_peer.system} rps at {hi} clients: {p.rps:,.0f} / {best_peer.rps:,.0f} = "
                f"{ratio:.2f}x  (target >= {TARGET_RATIO}x: {ok})"
            )
        if p.clients == lo:
            ok = "MET" if p.p50_ms < TARGET_P50_MS else "MISSED"
            out.append(f"{p.system} p50 at {lo} client: {p.p50_ms:.2f} ms  (target < {TARGET_P50_MS:g} ms: {ok})")
    inproc = by.get(("in-process", hi))
    if inproc:
        for p in points:
            if p.system.startswith("enginehouse") and p.clients == hi:
                out.append(f"{p.system} at {hi} clients is {p.rps / inproc.rps:.0%} of the engine's in-process rows/s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=12.0, help="measured seconds per point (default 12)")
    ap.add_argument(
        "--scrape-every",
        type=float,
        default=0.0,
        help="scrape Enginehouse's /metrics every S seconds during its points",
    )
    ap.add_argument(
        "--instances",
        type=int,
        default=2,
        help="replicas of the Enginehouse service (default 2: one event loop per core)",
    )
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds before each point (default 3)")
    ap.add_argument("--clients", default="1,32", help="comma-separated client counts (default 1,32)")
    ap.add_argument("--formats", default="json,binary", help="request formats to load: json, binary (default both)")
    ap.add_argument(
        "--replica-cpus",
        default="1",
        help="ENGINEHOUSE_REPLICA_CPUS; a comma-separated list runs Enginehouse once per value (default 1: see README)",
    )
    ap.add_argument(
        "--threads", type=int, help="engine threads in-process and in MLServer (default: round(replica-cpus))"
    )
    ap.add_argument("--num-cpus", type=int, default=2, help="--num-cpus of `enginehouse up` (default 2)")
    ap.add_argument(
        "--eh-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for `enginehouse up` (repeatable), e.g. RAY_SERVE_HAPROXY_NBTHREAD=2",
    )
    ap.add_argument("--client", choices=("httpx", "aiohttp"), default="aiohttp", help="HTTP client library")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-enginehouse", action="store_true")
    ap.add_argument("--skip-mlserver", action="store_true")
    ap.add_argument("--mlserver-venv", default=str(MLSERVER_VENV), help="venv with mlserver (created when missing)")
    ap.add_argument("--mlserver-workers", type=int, default=0, help="MLServer parallel_workers (default 0)")
    ap.add_argument("--mlserver-batch-time-ms", type=float, default=2.0, help="MLServer max_batch_time (default 2)")
    ap.add_argument("--start-timeout", type=float, default=240.0, help="seconds to wait for a server to be ready")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (model files, server logs)")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.formats = [f for f in args.formats.split(",") if f]
    if any("=" not in kv for kv in args.eh_env):
        ap.error("--eh-env takes KEY=VALUE")
    if set(args.formats) - {"json", "binary"}:
        ap.error("--formats takes json and/or binary")
    args.replica_cpus = [float(c) for c in args.replica_cpus.split(",")]
    threads = args.threads or max(1, round(args.replica_cpus[0]))

    t_all = time.monotonic()
    # short path: Ray's unix sockets live under RAY_TMPDIR and must stay under 107 characters
    tmp = Path(tempfile.mkdtemp(prefix="ehb-", dir="/tmp"))
    log(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; temp dir {tmp}; "
        f"client {args.client}; {args.warmup:g} s warm-up + {args.duration:g} s per point"
    )
    w = mlp_weights()
    model = build_repository(tmp / "repo", w)
    payloads = Payloads.make(w)
    log(f"built {model} ({model.stat().st_size / 1e6:.1f} MB), versions {', '.join(VERSIONS)}")

    points: list[Point] = []
    notes: list[str] = []
    try:
        if not args.skip_inprocess:
            log(f"in-process onnxruntime, intra_op_num_threads={threads}")
            for c in args.clients:
                points.append(bench_inprocess(model, threads, c, min(args.warmup, 2.0), args.duration))
        if not args.skip_enginehouse:
            for rc in args.replica_cpus:
                points += run_enginehouse(tmp, tmp / "repo", payloads, rc, args)
        if not args.skip_mlserver:
            got, note = run_mlserver(tmp, model, payloads, threads, args)
            points += got
            if note:
                notes.append(note)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_all
    print()
    print(
        f"MLP 256-1024-1024-10 fp32, 1x256 requests, {args.duration:g} s per point, "
        f"replica_cpus {','.join(f'{c:g}' for c in args.replica_cpus)}, engine threads {threads}, "
        f"Enginehouse: two-version 50/50 service via /v1/infers/{{id}}"
    )
    print("(in-process: rps@1 = sequential 1-row calls/s; rps@N = rows/s in N-row batches, latency per batch)")
    print(table(points, args.clients))
    print()
    for line in verdicts(points, args.clients) + notes:
        print(line)
    served = [p for p in points if not p.system.startswith("in-process")]
    if served:
        print(
            "load generator CPU (cores, of 2): "
            + ", ".join(f"{p.system}@{p.clients} {p.client_cpu:.2f}" for p in served)
        )
        print(
            "server CPU, whole process tree (cores; ms per answered request): "
            + ", ".join(f"{p.system}@{p.clients} {p.server_cpu:.2f}; {p.server_ms_per_request:.2f}" for p in served)
        )
    print(f"total time {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items()},
                    "points": [asdict(p) | {"rps": p.rps} for p in points],
                    "notes": notes,
                    "elapsed_s": elapsed,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
