"""Faults for real: a real `enginehouse up` subprocess whose real processes are killed by pid.

One `up` (test_up's ``_start_up``: its own ENGINEHOUSE_HOME, free loopback ports, HAProxy's stats and metrics
ports moved) with its own RAY_TMPDIR and Serve fallback-proxy ports, so it runs beside the session's Serve and
anyone else's Ray on the machine. It is started with an empty model repository (nothing is seeded) and the
tests create their services through the API from the example ``mlp-onnx`` (built by ``models.build.build_onnx``,
as the example repository is, without building the other examples). The tests share that
`up` in file order; each one leaves it running (restarted on the same home when the fault ended it) and each
starts it again if an earlier one could not. "The session" of an `up` is every process whose session id is
the `up`'s pid: `up` runs in a session of its own and every Ray process it starts stays in it.

Each fault prints one line (requests failed / total, recovery seconds, counters) with the capture off.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from serving.dataplane.counters import FLUSH_S
from serving.launcher import EXIT_RAY_DIED
from tests.conftest import free_port
from tests.serving import cp_harness as harness
from tests.serving.cp_harness import async_results
from tests.serving.test_up import _start_up, _stop

pytestmark = pytest.mark.slow
P = "default"
WAIT_S = 120.0  # the longest any single wait may take
#: the harness's poll, with this file's longest wait as its default
wait_for = functools.partial(harness.wait_for, timeout_s=WAIT_S)
GOOD = [[1.0, 2.0, 3.0, 4.0]]
BAD = [[1.0, 2.0]]  # the wrong shape: the replica answers 400 and counts a failed call
ASYNC_LEASE_S = 2  # a claim held by a killed replica is taken over after this (the default is 30 s)


def session_procs(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.cmdline()[0].rsplit('/', 1)[-1][:40]}[{p.pid}]")
        except (psutil.Error, IndexError):
            out.append(f"?[{p.pid}]")
    return out


class Up:
    """`enginehouse up` as a subprocess, restartable on the same home and the same ports."""

    def __init__(self, root: Path, repo: Path) -> None:
        self.root, self.repo, self.home = root, repo, root / "home"
        self.port, self.data_port = free_port(), free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.log: Path = root / "up-0.log"
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    @property
    def sid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start `up`; returns the seconds until its control plane answered."""
        self.starts += 1
        self.log = self.root / f"up-{self.starts}.log"
        t0 = time.monotonic()
        with pytest.MonkeyPatch.context() as mp:  # what _start_up does not set, through its copy of os.environ
            mp.setenv("RAY_TMPDIR", str(self.root / "ray"))  # short: Ray's unix sockets live under it
            mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # Serve's fallback proxy has fixed ports too (8500/9500), like HAProxy's stats and metrics
            mp.setenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(free_port()))
            mp.setenv("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", str(free_port()))
            proc = self.proc = _start_up(self.repo, self.home, self.port, self.data_port)
        # _start_up pipes stdout: drain it to a file, or a chatty `up` blocks on a full pipe
        threading.Thread(target=self._drain, args=(proc, self.log), daemon=True).start()

        def answers() -> bool:
            assert proc.poll() is None, f"up exited with {proc.returncode}:\n{self.tail()}"
            try:
                return self.client.get(f"/v1/{P}/services").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the control plane", answers, every_s=0.5)
        return time.monotonic() - t0

    @staticmethod
    def _drain(proc: subprocess.Popen[str], path: Path) -> None:
        assert proc.stdout is not None
        with path.open("w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> int:
        """SIGKILL the `up` process alone (its children are left to what Ray does); returns its session id."""
        assert self.proc is not None
        sid = self.proc.pid
        os.kill(sid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return sid

    def restart(self, old_sid: int) -> Restart:
        """Start `up` again at once, as a supervisor would, after session ``old_sid`` lost its `up`."""
        survivors = describe(session_procs(old_sid))
        at_ms = int(time.time() * 1000)
        took = self.start()
        swept = [
            line.split(" left: ", 1)[-1]
            for line in self.log.read_text().splitlines()
            if "killed enginehouse up" in line
        ]
        return Restart(at_ms, took, survivors, swept)

    # the API ---------------------------------------------------------------------------------------------
    def service(self, sid: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/{P}/services/{sid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def reach(self, sid: str, wanted: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert self.alive(), f"up exited with {self.proc and self.proc.returncode}:\n{self.tail()}"
            s = self.service(sid)
            assert s["status"] != "failed", s.get("error_msg")
            return s if s["status"] == wanted else None

        return dict(wait_for(f"service {sid} {wanted}", check, timeout_s=timeout_s, every_s=0.5))

    def events(self, sid: str) -> list[dict[str, Any]]:
        return list(self.client.get(f"/v1/{P}/services/{sid}/events").json()["events"])

    def counts(self, sid: str) -> tuple[int, int]:
        s = self.service(sid)
        return int(s["invocation_times"]), int(s["failed_times"])

    def settled_counts(self, sid: str, quiet_s: float = 2.0) -> tuple[int, int]:
        """The counters once they stopped moving for ``quiet_s`` (a flush and a reconcile tick are ~1.5 s)."""
        seen: list[tuple[float, tuple[int, int]]] = []

        def stable() -> tuple[int, int] | None:
            now = (time.monotonic(), self.counts(sid))
            if seen and seen[-1][1] != now[1]:
                seen.clear()
            seen.append(now)
            return now[1] if now[0] - seen[0][0] >= quiet_s else None

        inv, failed = wait_for(f"the counters of {sid} to settle", stable, timeout_s=30, every_s=0.25)
        return int(inv), int(failed)

    def replica_pids(self, service_id: str) -> list[int]:
        """Live replica processes of a service (Ray titles them ``ray::ServeReplica:<app>:replica``)."""
        title = f"ray::ServeReplica:{service_id}:"
        return [p.pid for p in session_procs(self.sid) if " ".join(p.cmdline()).startswith(title)]

    def async_rows(self, service_id: str) -> list[tuple[str, str, int, int, int]]:
        """(request_id, status, created_at, updated_at, attempts) of the service's async requests, from the
        registry file itself (read-only)."""
        db = sqlite3.connect(f"file:{self.home / 'registry.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(
                "SELECT request_id, status, created_at, updated_at, attempts FROM async_requests WHERE service_id = ?",
                (service_id,),
            ).fetchall()
        finally:
            db.close()


@dataclass
class Restart:
    at_ms: int  # wall clock, as the registry's timestamps
    seconds: float  # until the control plane answered
    survivors: list[str]  # live processes of the killed session when `up` was started again
    swept: list[str]  # what the new `up` said it ended of them ("ended N processes an earlier, killed ...")


@dataclass
class World:
    up: Up
    model_dir: Path
    model_id: str
    main: str  # the service every fault runs against: 2 replicas
    extra: str | None = None  # the one test 2 creates


def _entry(model_id: str, instances: int) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "weight": 100,
        "specification": "custom",
        "custom_spec": {"cpu": 0.25},
        "instance_count": instances,
        "envs": {"ENGINEHOUSE_ASYNC_LEASE_S": str(ASYNC_LEASE_S)},
    }


def _create(up: Up, name: str, model_id: str, instances: int) -> str:
    r = up.client.post(f"/v1/{P}/services", json={"service_name": name, "config": [_entry(model_id, instances)]})
    assert r.status_code == 200, r.text
    return str(r.json()["service_id"])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    from models.build import build_onnx

    root = Path(tempfile.mkdtemp(prefix="ehf-", dir="/tmp"))  # short: Ray's socket paths must stay < 107
    repo = root / "repo"
    repo.mkdir()
    model_dir = root / "home" / "models" / "mlp-onnx" / "1.0.0"  # under home/models: an allowed source root
    build_onnx(model_dir)
    up = Up(root, repo)
    up.start()
    try:
        r = up.client.post(
            f"/v1/{P}/models",
            json={
                "model_name": "mlp",
                "model_version": "1.0.0",
                "model_type": "ONNX",
                "source_location": str(model_dir),
            },
        )
        assert r.status_code == 200, r.text
        model_id = str(r.json()["model_id"])
        wait_for(
            "the model published",
            lambda: up.client.get(f"/v1/{P}/models/{model_id}").json()["model_status"] == "published",
        )
        main = _create(up, "faults", model_id, instances=2)
        up.reach(main, "running")
        yield World(up, model_dir, model_id, main)
    finally:
        if up.alive():
            sid = up.sid
            _stop(up.proc)  # type: ignore[arg-type]
            left = wait_for_gone(sid, 30)
            assert not left, f"processes left after SIGTERM: {left}"
        up.client.close()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_gone(sid: int, timeout_s: float) -> list[str]:
    """Wait (bounded) until session ``sid`` has no live process; returns what is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = session_procs(sid)
        if not left:
            return []
        time.sleep(0.5)
    return describe(session_procs(sid))


def ensure_up(w: World) -> None:
    """An earlier test may have left `up` down: start it again on the same home."""
    if not w.up.alive():
        w.up.start()
    w.up.reach(w.main, "running")


def say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}", flush=True)


# the model itself, run here --------------------------------------------------------------------------------
def _x(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).standard_normal((1, 4)).astype(np.float32)


def _async_body(i: int) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": _x(i).ravel().tolist()}],
    }


def _local(model_dir: Path, xs: list[np.ndarray]) -> list[np.ndarray]:
    """The model run in this process through runtimes.registry.load_model."""
    from runtimes.registry import load_model

    async def run() -> list[np.ndarray]:
        adapter = await load_model(model_dir)
        try:
            return [(await adapter.infer({"x": x}))["y"] for x in xs]
        finally:
            await adapter.unload()

    return asyncio.run(run())


def _check_results(model_dir: Path, done: dict[int, dict[str, Any]]) -> None:
    order = sorted(done)
    expected = _local(model_dir, [_x(i) for i in order])
    for i, want in zip(order, expected, strict=True):
        res = done[i]
        assert res["status"] == "succeeded", (i, res)
        assert res["result"]["id"] == f"r{i}"  # its own result, not another request's
        got = np.asarray(res["result"]["outputs"][0]["data"], np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, atol=1e-5)


def _post_async(url: str, n: int, accepted: dict[int, str], stop: threading.Event, threads: int = 4) -> list[str]:
    """POST /async for 0..n-1 from ``threads`` clients until done or ``stop``; 202s land in ``accepted``."""
    refused: list[str] = []

    def post(i: int) -> None:
        if stop.is_set():
            return
        try:
            r = httpx.post(f"{url}/async", json=_async_body(i), timeout=10)
        except httpx.HTTPError as exc:
            refused.append(type(exc).__name__)
            return
        if r.status_code == 202:
            accepted[i] = r.json()["request_id"]
        else:
            refused.append(f"{r.status_code}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, range(n)))
    return refused


def _async_counts(rows: list[tuple[str, str, int, int, int]], since_ms: int, restart_ms: int) -> tuple[int, int, int]:
    """Of the async requests stored since ``since_ms``: (all, finished before the restart, that is by the old
    cluster's replicas, run more than once)."""
    mine = [r for r in rows if r[2] >= since_ms]
    before = sum(1 for r in mine if r[1] in ("succeeded", "failed") and r[3] < restart_ms)
    return len(mine), before, sum(1 for r in mine if r[4] > 1)


# 1 -------------------------------------------------------------------------------------------------------
@dataclass
class Call:
    start: float
    end: float
    bad: bool  # sent with the wrong shape on purpose
    status: int | None  # None: no HTTP answer (the connection broke, or the client timed out)
    detail: str
    by_replica: bool  # answered by a replica (its JSON), so counted by it


def _load(url: str, seconds: float, clients: int = 4, bad_every: int = 10, max_per_client: int = 20_000) -> list[Call]:
    """A closed loop of ``clients`` threads for ``seconds``, each request with a 10 s timeout."""
    calls: list[Call] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        mine: list[Call] = []
        with httpx.Client(timeout=10) as c:
            for i in range(max_per_client):
                if time.monotonic() >= deadline:
                    break
                bad = (i + k) % bad_every == 0
                t0 = time.monotonic()
                try:
                    r = c.post(url, json={"instances": BAD if bad else GOOD})
                except httpx.HTTPError as exc:
                    mine.append(Call(t0, time.monotonic(), bad, None, f"{type(exc).__name__}: {exc}", False))
                    continue
                body: Any = None
                if r.headers.get("content-type", "").startswith("application/json"):
                    try:
                        body = r.json()
                    except ValueError:
                        body = None
                ours = isinstance(body, dict) and ("predictions" in body or "error" in body)
                mine.append(Call(t0, time.monotonic(), bad, r.status_code, r.text[:120], ours))
        with lock:
            calls.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 30)
    return calls


def _gone(pid: int, timeout_s: float = 5.0) -> float:
    """Wait until ``pid`` is dead (gone or a zombie); returns when, on the monotonic clock."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.001)
    return time.monotonic()


def test_replica_sigkilled_under_steady_load(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """A replica SIGKILLed while 4 clients load the service (2 replicas) for 8 s.

    Only the requests in flight at the killed replica may fail (sent before its process was dead), each at
    once (no hang) and visibly; every request sent after goes to the other replica. The killed replica is
    replaced.

    Counters: ``invocation_times`` grows by the number of answers a replica produced (its JSON:
    ``predictions`` or ``error``) and ``failed_times`` by those of them with an error status (the 400s sent on
    purpose). Answers the ingress made itself (a broken connection, HAProxy's own error pages) were not made by
    a replica and are not counted. A replica counts a call just before answering it, so a request in flight
    at the kill is neither answered nor counted. What the killed replica had counted but not yet handed over
    (it flushes every 0.5 s) is lost with it: that shows up here as ``lost``.
    """
    ensure_up(world)
    up, sid = world.up, world.main
    url = up.service(sid)["access_address"]
    assert len(up.replica_pids(sid)) == 2
    before = up.settled_counts(sid)

    victim = up.replica_pids(sid)[0]
    kill_at: list[float] = []

    def killer() -> None:
        time.sleep(3.0)
        kill_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        kill_at.append(_gone(victim))

    t = threading.Thread(target=killer)
    t.start()
    calls = _load(url, seconds=8.0)
    t.join()
    kill, dead = kill_at
    assert len(calls) > 200, f"too little load to mean anything: {len(calls)} calls"

    wrong = [c for c in calls if not c.by_replica]
    after = [c for c in calls if c.start >= kill]
    recovered = [c.end for c in after if c.status == 200 and c.by_replica]
    first_ok = min(recovered) - kill if recovered else float("inf")
    up.reach(sid, "running")
    wait_for("a second replica again", lambda: len(up.replica_pids(sid)) == 2 and victim not in up.replica_pids(sid))
    replaced = time.monotonic() - kill

    answered = [c for c in calls if c.by_replica]
    want = (len(answered), sum(1 for c in answered if c.status and c.status >= 400))
    now = up.settled_counts(sid)
    got = (now[0] - before[0], now[1] - before[1])
    recent = sum(1 for c in answered if kill - FLUSH_S <= c.end <= kill)
    say(
        capsys,
        f"FAULT 1 replica SIGKILL under load: failed {len(wrong)}/{len(calls)} "
        f"({sorted({c.detail.split(':')[0] if c.status is None else str(c.status) for c in wrong})}, sent "
        f"{[round(c.start - kill, 3) for c in wrong]} s from the kill, "
        f"failed after {[round(c.end - c.start, 3) for c in wrong]} s; the process was dead "
        f"{dead - kill:.3f} s after the kill); first success after the kill {first_ok:.2f} s, "
        f"replica replaced and service running after {replaced:.1f} s; "
        f"counters: counted {got[0]}/{got[1]} (calls/failed), answered by replicas {want[0]}/{want[1]}, "
        f"lost {want[0] - got[0]}/{want[1] - got[1]} (answers in the {FLUSH_S} s before the kill: {recent})",
    )
    for c in wrong:
        assert c.start < dead, f"a request sent {c.start - dead:.3f} s after the replica was dead failed: {c}"
        assert c.end - c.start < 5, f"a failure took {c.end - c.start:.1f} s: {c}"
        assert c.detail, c
    assert recovered and first_ok < 5, f"no success within 5 s of the kill (first {first_ok:.2f} s)"
    # What the replicas answered, less at most what the killed one answered since its last flush (it hands
    # its tally over every FLUSH_S): never more than answered, never double, and the loss bounded by the window.
    assert got[0] <= want[0] and got[1] <= want[1], f"counted {got} > answered by replicas {want}"
    assert want[0] - got[0] <= recent, (
        f"counters {got} vs answered by replicas {want}: lost {want[0] - got[0]}, more than the {recent} answers "
        f"in the {FLUSH_S} s before the kill"
    )


# 3 -------------------------------------------------------------------------------------------------------
def test_control_plane_sigkilled_during_async_traffic(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """`up` SIGKILLed while 4 clients submit 120 async requests; restarted on the same home.

    Every request that got a 202 ends ``succeeded`` with its own result (checked against the model run here);
    none is lost or left queued. Counters: ``failed_times`` does not move; ``invocation_times`` grows by one
    per stored request that finished after the restart, plus at most one per request that finished before it,
    on the old cluster's replicas (they run on for a second or two after `up` dies, and the counts they hold
    die with them: printed as ``lost``), never more. Every process of the killed `up`'s session is gone within
    90 s of the kill.
    """
    ensure_up(world)
    up, sid = world.up, world.main
    url = up.service(sid)["access_address"]
    before = up.settled_counts(sid)
    since_ms = int(time.time() * 1000) - 1
    accepted: dict[int, str] = {}
    stop = threading.Event()
    at_kill: list[int] = []

    def killer() -> None:
        wait_for("30 async requests accepted", lambda: len(accepted) >= 30, timeout_s=60, every_s=0.02)
        at_kill.append(len(accepted))
        kill_at.append(time.monotonic())
        old.append(up.sigkill())

    old: list[int] = []
    kill_at: list[float] = []
    t = threading.Thread(target=killer)
    t.start()
    refused = _post_async(url, 120, accepted, stop)
    t.join()
    killed = kill_at[0]
    assert at_kill and old, "the kill did not happen"
    restart = up.restart(old[0])
    up.reach(sid, "running")
    done = async_results(url, accepted, timeout_s=WAIT_S)
    all_done = time.monotonic() - killed
    _check_results(world.model_dir, done)
    assert up.service(sid)["async_queue"] == {"queued": 0, "running": 0}
    stored, finished_before, reruns = _async_counts(up.async_rows(sid), since_ms, restart.at_ms)
    now = up.settled_counts(sid)
    got = (now[0] - before[0], now[1] - before[1])
    left = wait_for_gone(old[0], 90 - (time.monotonic() - killed))
    say(
        capsys,
        f"FAULT 3 control plane SIGKILL during async traffic: 202 before the kill {at_kill[0]}, "
        f"in all {len(accepted)}; "
        f"not accepted {len(refused)}/120 ({sorted(set(refused))}); all {len(accepted)} succeeded with their own "
        f"results {all_done:.1f} s after the kill (restart {restart.seconds:.1f} s to the API; alive in the killed "
        f"session then: {restart.survivors}; ended by the new up: {restart.swept}); stored {stored} (finished "
        f"before the restart {finished_before}, run twice {reruns}); counters: counted {got[0]}/{got[1]}, stored "
        f"{stored} -> lost {stored - got[0]}; killed session empty 90 s after the kill: {not left}",
    )
    assert len(accepted) >= at_kill[0] >= 30
    assert got[1] == 0
    assert stored - finished_before <= got[0] <= stored, (got, stored, finished_before)
    assert not left, f"processes of the killed up's session still alive 90 s after the kill: {left}"


# 2 -------------------------------------------------------------------------------------------------------
def test_control_plane_sigkilled_during_a_deployment(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """`up` SIGKILLed while a service it was just asked for is ``deploying`` (its replica process started).

    Restarted at once on the same home, as a supervisor would: the service ends ``running`` (not half
    deployed) and answers, with its ``deploying`` event from before the kill and ``running`` last; the other
    service runs too. What the killed `up` left: printed (what was alive at the restart, what the new `up`
    ended); every process of its session is gone within 90 s of the kill.
    """
    ensure_up(world)
    up = world.up
    extra = world.extra = _create(up, "faults-late", world.model_id, instances=1)

    def half_deployed() -> bool:
        return up.service(extra)["status"] == "deploying" and bool(up.replica_pids(extra))

    wait_for("the new service deploying with a replica process", half_deployed, timeout_s=60, every_s=0.1)
    status_at_kill = up.service(extra)["status"]
    session = describe(session_procs(up.sid))
    killed = time.monotonic()
    old = up.sigkill()
    restart = up.restart(old)
    s = up.reach(extra, "running")
    running = time.monotonic() - killed
    up.reach(world.main, "running")
    r = httpx.post(s["access_address"], json={"instances": GOOD}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        r.json()["predictions"], _local(world.model_dir, [np.array(GOOD, np.float32)])[0], atol=1e-5
    )
    kinds = [e["status"] for e in up.events(extra)]
    left = wait_for_gone(old, 90 - (time.monotonic() - killed))
    gone = time.monotonic() - killed
    say(
        capsys,
        f"FAULT 2 control plane SIGKILL during a deployment: requests n/a; status at the kill {status_at_kill!r}; "
        f"the killed session had {len(session)} processes, at the restart {restart.survivors} were alive, the new up "
        f"ended {restart.swept}, all gone {gone:.1f} s after the kill (left: {left}); restart {restart.seconds:.1f} s "
        f"to the API, service running {running:.1f} s after the kill; events {kinds}",
    )
    assert "deploying" in kinds and kinds[-1] == "running", kinds
    assert "failed" not in kinds, kinds
    assert not left, f"processes of the killed up's session still alive 90 s after the kill: {left}"


# 4 -------------------------------------------------------------------------------------------------------
def test_embedded_ray_killed_under_the_control_plane(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """The embedded Ray's raylet and GCS server (children of `up`) SIGKILLed by pid, async requests pending.

    `up` notices, says so in its log and exits with ``EXIT_RAY_DIED`` within seconds, ending every process of
    the dead cluster (HAProxy included, which would otherwise keep the data port). Started again as a
    supervisor would: both services run; the counters committed before the kill are intact (not lost, not
    doubled) and new calls are counted exactly; every accepted async request succeeds with its own result.
    Counters: ``failed_times`` grows by the 4 failed calls after the restart, ``invocation_times`` by
    the 20 calls after the restart plus one per stored async request (a replica counts an async request once,
    when its result lands). Counts not yet committed to the registry when the cluster died (async requests that
    finished in the last second or so) die with it: they show up as ``lost``.
    """
    ensure_up(world)
    up, sid = world.up, world.main
    url = up.service(sid)["access_address"]
    with httpx.Client(timeout=30) as c:
        for i in range(20):
            r = c.post(url, json={"instances": BAD if i % 5 == 0 else GOOD})
            assert r.status_code == (400 if i % 5 == 0 else 200), r.text
    before = up.settled_counts(sid)  # committed: 20 more calls, 4 failed, are in it
    since_ms = int(time.time() * 1000) - 1
    accepted: dict[int, str] = {}
    _post_async(url, 40, accepted, threading.Event())
    assert len(accepted) == 40
    ray_procs = [p for p in psutil.Process(up.sid).children() if p.name() in ("raylet", "gcs_server")]
    assert sorted(p.name() for p in ray_procs) == ["gcs_server", "raylet"]
    old = up.sid
    killed = time.monotonic()
    for p in ray_procs:
        p.send_signal(signal.SIGKILL)
    assert up.proc is not None
    try:
        code = up.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"up still running 60 s after its Ray was killed:\n{up.tail()}")
    exited = time.monotonic() - killed
    left = wait_for_gone(old, 10)
    log = up.log.read_text(errors="replace")
    said = [line.split(" ERROR enginehouse [-] ", 1)[-1] for line in log.splitlines() if "ERROR enginehouse" in line]
    restart = up.restart(old)
    up.reach(sid, "running")
    if world.extra:
        up.reach(world.extra, "running")
    back = time.monotonic() - killed
    done = async_results(url, accepted, timeout_s=WAIT_S)
    all_done = time.monotonic() - killed
    _check_results(world.model_dir, done)
    with httpx.Client(timeout=30) as c:
        for i in range(20):
            r = c.post(url, json={"instances": BAD if i % 5 == 0 else GOOD})
            assert r.status_code == (400 if i % 5 == 0 else 200), r.text
    stored, finished_before, reruns = _async_counts(up.async_rows(sid), since_ms, restart.at_ms)
    now = up.settled_counts(sid)
    got = (now[0] - before[0], now[1] - before[1])
    say(
        capsys,
        f"FAULT 4 embedded Ray (raylet + GCS) SIGKILLed: up exited {code} after {exited:.1f} s, saying {said}; left "
        f"behind {left or 'nothing'}; restart {restart.seconds:.1f} s to the API, services running {back:.1f} s "
        f"after the kill; async 40/40 accepted, failed 0/40, all succeeded {all_done:.1f} s after the kill "
        f"(finished before the restart {finished_before}, run twice {reruns}); counters since the committed "
        f"baseline: {got[0]}/{got[1]} for 20 sync calls (4 failed) after the restart + {stored} async -> lost "
        f"{20 + stored - got[0]}",
    )
    assert code == EXIT_RAY_DIED, f"exit status {code}:\n{up.tail()}"
    assert "the embedded Ray died" in log, log[-3000:]
    assert exited < 10, f"up took {exited:.1f} s to notice"
    assert not left, f"processes left by the dead cluster: {left}"
    assert got[1] == 4  # the committed baseline survived, and the 4 failed calls after the restart counted
    assert got[0] >= 20 + stored - finished_before, "counts of calls made after the restart are missing"
    # the counts of async requests that finished on the dying cluster in its last moments (at most
    # finished_before) may die with it before they are committed: bounded above, never double
    assert got[0] <= 20 + stored, f"invocation_times grew by {got[0]}, more than 20 + {stored}: double counted"
