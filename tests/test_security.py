"""The security properties SECURITY.md claims that no other test shows, each shown here.

Static: no subprocess call in serving/ or runtimes/ goes through a shell. Unit: tokens are compared as
SHA-256 digests (in constant time for configured tokens), only digests leave the control plane, a project's
templates stay its own, management logs carry neither a token nor a payload, an unauthenticated request
is refused before its body is parsed, and management bodies are size-limited like inference bodies. Live
(the session's Ray Serve, HAProxy mode): the embedded Ray authenticates with a token, every listener beyond
loopback is one SECURITY.md names, a replica's own port checks the token as the ingress does, and the
replicas' logs carry neither the token nor the payload of a request.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from serving.controlplane.app import create_app
from serving.controlplane.auth import Authenticator
from serving.controlplane.manager import Manager
from serving.logs import setup_logging
from serving.registry import Registry, open_registry
from serving.tokens import hash_token

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("serving", "runtimes") for p in (ROOT / d).rglob("*.py"))


# --- no shell ------------------------------------------------------------------------------------------------

#: calls that hand a string to /bin/sh whatever their arguments
SHELL_CALLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
    "create_subprocess_shell",
    "pty.spawn",
}
SPAWN_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
SPAWN_CALLS |= {"subprocess.check_output", "asyncio.create_subprocess_exec", "os.execv", "os.execvp", "os.spawnv"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain, else ""."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _scan(path: Path, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(shell uses, process spawns) in one file, as ``file:line call``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root)
    bad, spawns = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "asyncio", "pty"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in SHELL_CALLS:
                    bad.append(f"{rel}:{node.lineno} from {node.module} import {alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in SHELL_CALLS:
            bad.append(f"{rel}:{node.lineno} {name}()")
        for kw in node.keywords:
            # shell=False is the only harmless value; a variable could be True at run time
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                bad.append(f"{rel}:{node.lineno} {name}(shell={ast.unparse(kw.value)})")
        if name in SPAWN_CALLS:
            spawns.append(f"{rel}:{node.lineno} {name}")
    return bad, spawns


def test_no_subprocess_call_goes_through_a_shell() -> None:
    bad: list[str] = []
    spawns: list[str] = []
    for path in SOURCES:
        b, s = _scan(path)
        bad += b
        spawns += s
    assert bad == [], bad
    # the scan sees the real spawns (so it is not vacuous): the Custom engine's server and its docker calls
    assert any(s.startswith("runtimes/custom.py") and s.endswith("subprocess.Popen") for s in spawns), spawns


def test_the_scan_catches_a_shell(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, subprocess\nfrom os import system\n"
        "subprocess.run('x', shell=True)\nsubprocess.Popen(['x'], shell=flag)\nos.system('x')\n"
    )
    bad, _ = _scan(probe, tmp_path)
    assert [b.split(" ", 1)[1] for b in bad] == [
        "from os import system",
        "subprocess.run(shell=True)",
        "subprocess.Popen(shell=flag)",
        "os.system()",
    ]


# --- tokens --------------------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(None, tmp_path)
    yield reg
    reg.close()


def test_configured_tokens_are_compared_as_digests_in_constant_time(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.controlplane import auth as auth_module

    seen: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        seen.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", recording)
    auth = Authenticator(registry, {"s3cret-a": "a", "s3cret-b": "b"})
    assert auth.project_of("s3cret-b") == "b" and auth.project_of("s3cret-c") is None
    assert seen, "hmac.compare_digest was not used"
    for a, b in seen:
        assert len(a) == len(b) == 64 and "s3cret" not in a + b  # digests against digests, never clear text
    # every configured digest is compared, not only up to the first match (no early exit on a miss)
    assert len([s for s in seen if s[1] == hash_token("s3cret-c")]) == 2


def test_only_token_digests_leave_the_control_plane(registry: Registry) -> None:
    registry.add_token("c", "stored-s3cret", "ci")
    auth = Authenticator(registry, {"env-s3cret": "e"})
    tokens = auth.token_map()  # what the reconciler puts into every replica's and the gateway's user_config
    assert tokens == {hash_token("env-s3cret"): "e", hash_token("stored-s3cret"): "c"}
    assert "s3cret" not in json.dumps(tokens)
    assert hash_token("x") == hashlib.sha256(b"x").hexdigest()
    assert registry.project_for_token("stored-s3cret") == "c"  # found by its digest


def _app(registry: Registry, tmp_path: Path, tokens: dict[str, str]) -> TestClient:
    manager = Manager(registry=registry, data_address="http://127.0.0.1:8000", roots=[tmp_path], catalogue={})
    return TestClient(create_app(manager, Authenticator(registry, tokens)), raise_server_exceptions=False)


def test_a_token_sees_system_templates_and_its_own_projects_only(registry: Registry, tmp_path: Path) -> None:
    from serving.controlplane import templates

    templates.seed_system(registry)
    c = _app(registry, tmp_path, {"tok-a": "a", "tok-b": "b"})
    body = {"name": "private-a", "startCommand": ["python", "server.py"]}
    r = c.post("/v1/a/model-services", json=body, headers={"X-Auth-Token": "tok-a"})
    assert r.status_code == 200, r.text
    uuid_a = r.json()["uuid"]
    for token, visible in (("tok-a", True), ("tok-b", False)):
        h = {"Authorization": f"OAuth {token}"}
        names = {t["name"] for t in c.get("/zstack/v1/ai/model-services", headers=h).json()["inventories"]}
        assert {t["name"] for t in templates.SYSTEM_TEMPLATES} <= names
        assert ("private-a" in names) is visible
        assert (c.get(f"/zstack/v1/ai/model-services/{uuid_a}", headers=h).status_code == 200) is visible
    assert c.get("/v1/a/model-services", headers={"X-Auth-Token": "tok-b"}).status_code == 403
    assert c.get("/zstack/v1/ai/model-services").status_code == 401


# --- what reaches the logs -----------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    setup_logging("json", level=logging.DEBUG, stream=out)
    yield out
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_management_logs_carry_no_token_and_no_payload(
    json_logs: io.StringIO, registry: Registry, tmp_path: Path, example_models: Path
) -> None:
    token, marker = f"tok-{uuid.uuid4().hex}", f"PAYLOAD-{uuid.uuid4().hex}"
    manager = Manager(registry=registry, data_address="http://127.0.0.1:8000", roots=[example_models])
    manager.validate_later = lambda project, model_id: None  # type: ignore[method-assign]  # no Ray probe here
    c = TestClient(create_app(manager, Authenticator(registry, {token: "default"})), raise_server_exceptions=False)
    h = {"X-Auth-Token": token}
    model = {"model_name": "m", "model_version": "1.0.0", "model_type": "ONNX", "description": marker}
    model["source_location"] = str(example_models / "mlp-onnx" / "1.0.0")
    r = c.post("/v1/default/models", json=model, headers=h)
    assert r.status_code == 200, r.text
    assert c.post("/v1/default/models", json=model | {"colour": marker}, headers=h).status_code == 400
    assert c.post("/v1/default/models", content=f'{{"x": "{marker}"', headers=h).status_code == 400
    assert c.get("/v1/default/models", headers={"X-Auth-Token": token + marker}).status_code == 401
    assert c.post("/v1/default/services", json={"service_name": marker}, headers=h).status_code == 400
    logged = json_logs.getvalue()
    assert "registered in default" in logged  # the requests were logged at all
    assert token not in logged and marker not in logged


# --- the control plane's own input limits (SECURITY.md: open items) ---------------------------------------------


def test_an_unauthenticated_request_is_refused_before_its_body_is_parsed(registry: Registry, tmp_path: Path) -> None:
    # Open until the control plane's guard: the body was parsed (and answered 400) before the token was
    # checked, so anyone who could reach the port made the control plane parse JSON of any size.
    c = _app(registry, tmp_path, {"tok": "default"})
    r = c.post("/v1/default/models", content=b'{"not json')
    assert r.status_code == 401, f"{r.status_code} {r.text}"


def test_management_bodies_are_size_limited_like_inference_bodies(registry: Registry, tmp_path: Path) -> None:
    # Open until the control plane's guard: the data plane refused bodies over ENGINEHOUSE_MAX_BODY_MB
    # (64 MB by default) with 413; the control plane read and parsed a body of any size.
    c = _app(registry, tmp_path, {})
    limit = int(float(os.environ.get("ENGINEHOUSE_MAX_BODY_MB", "64")) * 1024 * 1024)
    body = b'{"description": "' + b"x" * limit + b'"}'
    r = c.post("/v1/default/models", content=body)
    assert r.status_code == 413, f"{r.status_code} {r.text[:300]}"


# --- live: the session's Ray Serve in HAProxy mode ------------------------------------------------------------


@dataclass
class Guarded:
    url: str  # through the HAProxy ingress
    token: str
    data_port: int


@pytest.fixture(scope="module")
def guarded(serve_instance: str, example_models: Path) -> Iterator[Guarded]:
    """The mlp as a service whose replicas check tokens (what the reconciler deploys when auth is on)."""
    from serving.dataplane import deploy

    token = f"tok-{uuid.uuid4().hex}"
    versions = [{"version": "1.0.0", "model_dir": str(example_models / "mlp-onnx" / "1.0.0"), "weight": 100}]
    auth = {"project": "p", "tokens": {hash_token(token): "p"}}
    deploy.put(deploy.service_app("sec", versions, num_cpus=0.25, auth=auth))
    deploy.wait_running("sec")
    url = f"{serve_instance}/v1/infers/sec"
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v2/health/ready", timeout=10).status_code != 200:  # HAProxy has the route (no token)
        assert time.monotonic() < deadline, "HAProxy does not route to sec"
        time.sleep(0.2)
    yield Guarded(url, token, int(serve_instance.rsplit(":", 1)[1]))
    deploy.remove("sec")


def _processes() -> list[psutil.Process]:
    """This test session and everything it started: Ray's daemons, workers, replicas, HAProxy."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _listeners(processes: list[psutil.Process]) -> list[tuple[str, int, psutil.Process]]:
    out = []
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        out += [(c.laddr.ip, c.laddr.port, p) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def test_the_embedded_ray_authenticates_with_a_token(serve_instance: str) -> None:
    from ray._raylet import AuthenticationMode, get_authentication_mode  # type: ignore[attr-defined]

    assert get_authentication_mode() == AuthenticationMode.TOKEN


def test_every_listener_beyond_loopback_is_a_documented_one(guarded: Guarded) -> None:
    """SECURITY.md's port table: what a session of Enginehouse's data plane listens on, by interface."""
    from ray.serve._private import constants

    processes = _processes()
    listeners = _listeners(processes)
    # read as HAProxy was configured: the session fixture moves both ports through the environment
    stats = int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", constants.RAY_SERVE_HAPROXY_STATS_PORT))
    metrics = int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", constants.RAY_SERVE_HAPROXY_METRICS_PORT))
    # the ingress the clients use is on the data plane's host (127.0.0.1 here)
    # (looked up machine-wide: HAProxy may have been re-parented away from this session's process tree)
    ingress = {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == guarded.data_port
    }
    assert ingress == {"127.0.0.1"}, ingress
    documented = {
        "haproxy stats page (RAY_SERVE_HAPROXY_STATS_PORT)": lambda ip, port, p: port == stats,
        "haproxy prometheus exporter (RAY_SERVE_HAPROXY_METRICS_PORT)": lambda ip, port, p: port == metrics,
        "replica inter-deployment gRPC (random port)": lambda ip, port, p: (
            "ServeReplica" in _cmdline(p)
            and not constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
            <= port
            <= constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
        ),
    }
    seen: dict[str, int] = dict.fromkeys(documented, 0)
    unknown = []
    for ip, port, p in listeners:
        if _loopback(ip):
            continue
        kinds = [k for k, match in documented.items() if match(ip, port, p)]
        if kinds:
            seen[kinds[0]] += 1
        else:
            unknown.append((ip, port, _cmdline(p)[:80]))
    assert unknown == [], f"listeners beyond loopback that SECURITY.md does not name: {unknown}"
    assert seen["replica inter-deployment gRPC (random port)"] >= 1, seen  # the replica of `sec` has one
    # and HAProxy's two pages, looked up by port across the machine, are there on all interfaces
    wildcard = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    for port in (stats, metrics):
        assert any(p == port and not _loopback(ip) for ip, p in wildcard), f"port {port} is not on all interfaces"


def _replica_http_port(name: str) -> int:
    from ray.serve._private import constants

    low, high = constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
    replicas = [p for p in _processes() if f"ServeReplica:{name}:" in _cmdline(p)]
    ports = [port for _, port, _ in _listeners(replicas) if low <= port <= high]
    assert len(ports) == 1, (ports, [_cmdline(p) for p in replicas])
    return ports[0]


def test_a_replicas_own_port_checks_the_token_as_the_ingress_does(guarded: Guarded) -> None:
    body = {"instances": [[1, 2, 3, 4]]}
    port = _replica_http_port("sec")
    for url in (guarded.url, f"http://127.0.0.1:{port}/v1/infers/sec"):
        assert httpx.post(url, json=body, timeout=30).status_code == 401, url
        assert httpx.post(url, json=body, headers={"X-Auth-Token": "nope"}, timeout=30).status_code == 401, url
        r = httpx.post(url, json=body, headers={"X-Auth-Token": guarded.token}, timeout=30)
        assert r.status_code == 200, (url, r.text)


def _logs_dir() -> Path:
    import ray

    node = ray._private.worker._global_node
    assert node is not None
    return Path(node.get_logs_dir_path())


def test_replica_logs_carry_no_token_and_no_payload(guarded: Guarded) -> None:
    marker = f"PAYLOAD-{uuid.uuid4().hex}"
    h = {"X-Auth-Token": guarded.token}
    good = {"id": marker, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    assert httpx.post(guarded.url, json=good, headers=h, timeout=30).json()["id"] == marker
    bad: list[Any] = [
        {"inputs": [{"name": marker, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        {"inputs": [{"name": "x", "shape": [1], "datatype": marker, "data": [1]}]},
        {"instances": [[marker]]},
    ]
    for body in bad:
        r = httpx.post(guarded.url, json=body, headers=h, timeout=30)
        assert r.status_code == 400 and marker in r.text  # told to the caller, who sent it
    assert httpx.post(guarded.url, json=good, headers={"X-Auth-Token": marker}, timeout=30).status_code == 401
    # stop the replica, so that whatever its loggers buffered is on disk
    from serving.dataplane import deploy

    replicas = [p for p in _processes() if "ServeReplica:sec:" in _cmdline(p)]
    assert replicas
    deploy.remove("sec")
    psutil.wait_procs(replicas, timeout=60)
    time.sleep(1)
    logs = _logs_dir()
    replica_logs = list((logs / "serve").glob("replica_sec_*.log"))
    # the replica's own log is there (Serve at WARNING in throughput mode and no access log: often empty); the
    # scan reads it and every other file of the session: Ray's daemons, workers' stdout/stderr, Serve's logs
    assert replica_logs, sorted(p.name for p in (logs / "serve").iterdir())
    leaks = []
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            leaks += [f"{f.name}: {what}" for what in (guarded.token, marker) if what.encode() in data]
    assert leaks == [], leaks
