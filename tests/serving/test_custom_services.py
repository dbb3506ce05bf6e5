"""Custom engines as services, and ZStack model-service templates, over real HTTP on the session's Ray Serve.

A service runs a FastAPI app from the shipped ``fastapi-app`` template and the echo server from a user
command, side by side at 50/50; the tests call both through the data plane (sub-paths, binary bodies, a
streamed answer), kill a user server by pid and watch the service come back, and stop the service with
no process left over.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serving.controlplane.templates import SYSTEM_TEMPLATES, template_uuid
from serving.registry import open_registry
from tests.serving.cp_harness import (
    ControlPlane,
    cp_settings,
    create,
    events,
    model_status,
    reach,
    service,
    settled_counts,
    start_control_plane,
    wait_for,
)

P = "default"
TOKEN = "custom-services-token"
AUTH = {"Authorization": f"OAuth {TOKEN}"}
CPU = {"specification": "custom", "custom_spec": {"cpu": 0.25}}
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
REFERENCE_FIELDS = {
    "uuid", "name", "description", "readme", "yaml", "requestCpu", "requestMemory", "modelCenterUuid", "type",
    "framework", "source", "size", "system", "hasNewVersion", "gpuComputeCapability", "installPath",
    "pythonVersion", "condaVersion", "version", "startCommand", "containerCommand", "containerArgs",
    "supportDistributed", "cpuArchitectures", "vendorToSpecUuidsMap", "modelServiceRefs", "modelServiceImages",
    "createDate", "lastOpDate",
}  # fmt: skip

APP = """
import asyncio, os
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

app = FastAPI()

@app.get("/health")
def health():
    return {"ok": True}

@app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
async def anything(path: str, request: Request):
    if path == "stream":
        async def lines():
            for i in range(5):
                yield f"tick {i}\\n".encode()
                await asyncio.sleep(0.05)
        return StreamingResponse(lines(), media_type="text/plain")
    body = await request.body()
    return Response(
        body[::-1],
        media_type="application/octet-stream",
        headers={"x-path": "/" + path, "x-query": request.url.query, "x-pid": str(os.getpid()),
                 "x-greeting": os.environ.get("GREETING", ""), "x-workers": os.environ.get("WEB_CONCURRENCY", "")},
    )
"""

FLAKY = """
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
if not os.path.exists("ready.txt"):
    print("cannot start: ready.txt is missing from the model folder", flush=True)
    sys.exit(3)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
ThreadingHTTPServer(("127.0.0.1", int(os.environ["ENGINEHOUSE_PORT"])), H).serve_forever()
"""


@dataclass
class Env:
    cp: ControlPlane
    own: Path

    @property
    def c(self) -> httpx.Client:
        return self.cp.client


@pytest.fixture(scope="module")
def env(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("custom-home")
    own = home / "models"
    (own / "fastapi-app").mkdir(parents=True)
    (own / "fastapi-app" / "app.py").write_text(textwrap.dedent(APP))
    shutil.copytree(REPO_MODELS / "echo-http" / "1.0.0", own / "echo")
    (own / "echo" / "config.json").unlink()  # the command comes from the API here, not from the folder
    (own / "flaky").mkdir()
    (own / "flaky" / "server.py").write_text(textwrap.dedent(FLAKY))
    (own / "flaky" / "ready.txt").write_text("yes")
    settings = cp_settings(serve_instance, example_models, home, own, auth_tokens=f"{P}:{TOKEN}")
    registry = open_registry(None, home)
    e = Env(start_control_plane(settings, registry), own)
    e.c.headers.update(AUTH)
    yield e
    e.cp.stop()
    deploy.sync({})
    registry.close()


def _model(c: httpx.Client, name: str, source: Path, **custom: Any) -> httpx.Response:
    body = {"model_name": name, "model_version": "1.0.0", "model_type": "Custom", "source_location": str(source)}
    return c.post(f"/v1/{P}/models", json=body | custom)


def _template(**fields: Any) -> dict[str, Any]:
    return {"name": "greeter", "startCommand": ["python", "server.py", "--port", "{port}"]} | fields


# -- the ZStack API ----------------------------------------------------------------------------------------
def test_zstack_list_answers_a_curl_in_the_reference_shape(env: Env) -> None:
    url = f"{env.cp.url}/zstack/v1/ai/model-services"
    out = subprocess.run(
        ["curl", "-s", "-H", "Content-Type: application/json;charset=UTF-8", "-H", f"Authorization: OAuth {TOKEN}",
         "-X", "GET", url],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    answer = json.loads(out.stdout)
    assert answer["success"] is True and answer["error"] is None
    inventories = answer["inventories"]
    assert [i["name"] for i in inventories if i["system"]] == [t["name"] for t in SYSTEM_TEMPLATES]
    for item in inventories:
        assert set(item) >= REFERENCE_FIELDS, REFERENCE_FIELDS - set(item)
        assert isinstance(item["requestCpu"], int) and isinstance(item["supportDistributed"], bool)
        assert item["createDate"].endswith(("AM", "PM"))  # ZStack's timestamp form
    fastapi = next(i for i in inventories if i["name"] == "fastapi-app")
    assert fastapi["uuid"] == template_uuid("fastapi-app") and fastapi["startCommand"].startswith("python -m uvicorn")

    one = httpx.get(f"{url}/{fastapi['uuid']}", headers=AUTH).json()
    assert one == {"success": True, "error": None, "inventories": [fastapi]}

    missing = httpx.get(f"{url}/0123456789abcdef", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["success"] is False
    assert set(missing.json()["error"]) == {"code", "description", "details", "elaboration", "opaque", "cause"}
    for headers, code in (({}, 401), ({"Authorization": "OAuth wrong"}, 401)):
        r = httpx.get(url, headers=headers)
        assert r.status_code == code and r.json()["error"]["code"] == "EH.0502"


def test_templates_are_created_listed_and_deleted_with_the_reason_when_refused(env: Env) -> None:
    c = env.c
    yaml = "parameters:\n  GREETING: {type: string, required: true}\n"
    r = c.post(f"/v1/{P}/model-services", json=_template(yaml=yaml, framework="Python", requestCpu=2))
    assert r.status_code == 200, r.text
    uuid = r.json()["uuid"]
    listed = c.get(f"/v1/{P}/model-services").json()["inventories"]
    assert [i["uuid"] for i in listed if not i["system"]] == [uuid]
    assert c.get(f"/v1/{P}/model-services/{uuid}").json()["startCommand"] == "python server.py --port '{port}'"
    # a string command is split into arguments, never handed to a shell
    r = c.post(f"/v1/{P}/model-services", json=_template(name="split", startCommand="python s.py --x 'a b'"))
    split = c.get(f"/v1/{P}/model-services/{r.json()['uuid']}").json()
    assert split["startCommand"] == "python s.py --x 'a b'"
    assert c.delete(f"/v1/{P}/model-services/{r.json()['uuid']}").status_code == 200

    bad = [
        (_template(name="t1", yaml="parameters:\n  X: {type: tensor}\n"), "unknown field type 'tensor'"),
        (_template(name="t2", yaml="parameters: [1, 2]\n"), "parameters"),
        (_template(name="t3", yaml="a: [unclosed\n"), "not valid YAML"),
        (_template(name="t4", startCommand=[]), "startCommand is empty"),
        (_template(name="t5", startCommand=""), "startCommand is empty"),
        (_template(name="t6", startCommand=["python", " "]), "empty argument"),
        (_template(name="t7", port=80), "port"),
        (_template(name="t8", port=70000), "port"),
        (_template(name="t9", system=True), "system"),
        ({"name": "t10"}, "startCommand (an argument list) or modelServiceImages"),
        (_template(name="t11", requestCpu="many"), "requestCpu"),
        (_template(name="t12", modelServiceImages=["bad image; rm -rf /"]), "container image"),
        (_template(name="t13", yaml="parameters:\n  N: {type: integer, default: x}\n"), "not of type integer"),
    ]
    for body, reason in bad:
        r = c.post(f"/v1/{P}/model-services", json=body)
        assert r.status_code == 400 and r.json()["error_code"] == "EH.0501", (body, r.text)
        assert reason in r.json()["error_msg"], (reason, r.text)
    assert c.post(f"/v1/{P}/model-services", json=_template()).status_code == 409  # the name is taken

    # a model made from it holds it; the template's parameters are checked at registration
    echo = env.own / "echo"
    for params, reason in (
        ({}, "template_params.GREETING: required"),
        ({"GREETING": 5}, "not of type string"),
        ({"GREETING": "hi", "OTHER": "x"}, "takes no such parameter"),
    ):
        r = _model(c, "greeter-bad", echo, template="greeter", template_params=params)
        assert r.status_code == 400 and reason in r.json()["error_msg"], r.text
    assert "not found" in _model(c, "nope", echo, template="no-such-template").json()["error_msg"]
    mid = _model(c, "greeter", echo, template=uuid, template_params={"GREETING": "hi"}).json()["model_id"]
    model_status(c, mid, "published")
    assert c.get(f"/v1/{P}/models/{mid}").json()["template"] == uuid
    r = c.delete(f"/v1/{P}/model-services/{uuid}")
    assert r.status_code == 409 and "greeter 1.0.0" in r.json()["error_msg"]
    users = c.get(f"/v1/{P}/model-services/{uuid}").json()["modelServiceRefs"]
    assert users == [{"modelUuid": mid, "model": "greeter 1.0.0"}]
    r = c.delete(f"/v1/{P}/model-services/{template_uuid('fastapi-app')}")
    assert r.status_code == 409 and "ships with Enginehouse" in r.json()["error_msg"]
    assert c.delete(f"/v1/{P}/models/{mid}").status_code == 200
    assert c.delete(f"/v1/{P}/model-services/{uuid}").status_code == 200
    assert c.get(f"/v1/{P}/model-services/{uuid}").status_code == 404


# -- custom services ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def custom_service(env: Env) -> dict[str, Any]:
    c = env.c
    app = _model(
        c, "fastapi-app", env.own / "fastapi-app", template="fastapi-app", template_params={"WEB_CONCURRENCY": 1}
    ).json()["model_id"]
    echo = c.post(
        f"/v1/{P}/models",
        json={
            "model_name": "echo",
            "model_version": "2.0.0",
            "model_type": "Custom",
            "source_location": str(env.own / "echo"),
            "start_command": ["python", "server.py", "--port", "{port}", "--label", "a b; $(whoami)"],
        },
    ).json()["model_id"]
    for mid in (app, echo):
        model_status(c, mid, "published")
    sid = create(c, "custom", [{"model_id": app, "weight": 50, **CPU}, {"model_id": echo, "weight": 50, **CPU}])
    return reach(c, sid, "running", timeout_s=180)


def _call(
    address: str, path: str, version: str | None = None, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    sent = {**AUTH, **({"X-Model-Version": version} if version else {}), **(headers or {})}
    return httpx.post(f"{address}{path}", headers=sent, timeout=30, **kw)


def test_both_servers_answer_with_sub_path_body_and_stream_intact(env: Env, custom_service: dict[str, Any]) -> None:
    address = custom_service["access_address"]
    blob = bytes(range(256)) * 4
    app = _call(address, "/predict/deep?x=1&y=two", "1.0.0", content=blob)
    assert app.status_code == 200 and app.content == blob[::-1]
    assert app.headers["x-path"] == "/predict/deep" and app.headers["x-query"] == "x=1&y=two"
    assert app.headers["x-workers"] == "1"  # the template's parameter reached the server by env

    png = b"\x89PNG\r\n\x1a\n\xff\xfe"
    echo = _call(address, "/a/b?k=v", "2.0.0", content=png, headers={"Content-Type": "image/png"})
    got = echo.json()
    assert echo.status_code == 200 and got["path"] == "/a/b" and got["query"] == "k=v"
    assert base64.b64decode(got["body_base64"]) == png and got["body_text"] is None
    assert got["headers"]["content-type"] == "image/png"
    assert got["label"] == "a b; $(whoami)"  # an argument, never a shell's words

    for version, line in (("1.0.0", "tick"), ("2.0.0", "line")):
        with httpx.stream("GET", f"{address}/stream", headers={**AUTH, "X-Model-Version": version}) as r:
            assert r.status_code == 200 and "content-length" not in r.headers
            parts = list(r.iter_bytes())
        assert b"".join(parts) == b"".join(f"{line} {i}\n".encode() for i in range(5))


def test_weighted_traffic_and_counters_as_for_any_engine(env: Env, custom_service: dict[str, Any]) -> None:
    sid, address = custom_service["service_id"], custom_service["access_address"]
    before = dict(zip(("invocation_times", "failed_times"), settled_counts(env.c, sid), strict=True))
    seen = {"app": 0, "echo": 0}
    for _ in range(60):
        r = _call(address, "/x", content=b"hello")
        assert r.status_code == 200
        seen["app" if "x-pid" in r.headers else "echo"] += 1
    assert seen["app"] > 10 and seen["echo"] > 10, seen
    assert httpx.post(f"{address}/x", timeout=30).status_code == 401  # no token: refused, and counted

    def counted() -> tuple[int, int]:
        s = service(env.c, sid)
        return s["invocation_times"] - before["invocation_times"], s["failed_times"] - before["failed_times"]

    seen: list[tuple[int, int]] = []
    wait_for("61 calls counted, 1 failed", lambda: seen.append(counted()) or seen[-1] == (61, 1), timeout_s=60)


def _server_pids(address: str) -> dict[str, int]:
    app = _call(address, "/pid", "1.0.0").headers["x-pid"]
    echo = _call(address, "/pid", "2.0.0").json()["pid"]
    return {"app": int(app), "echo": int(echo)}


def test_a_killed_user_server_comes_back(env: Env, custom_service: dict[str, Any]) -> None:
    sid, address = custom_service["service_id"], custom_service["access_address"]
    first = _server_pids(address)
    os.kill(first["echo"], signal.SIGKILL)
    reach(env.c, sid, "concerning", timeout_s=60)
    reach(env.c, sid, "running", timeout_s=120)
    again = wait_for("both servers answer", lambda: _ok_pids(address), timeout_s=60)
    assert again["echo"] != first["echo"]
    assert not psutil.pid_exists(first["app"]) or psutil.Process(first["app"]).status() == psutil.STATUS_ZOMBIE
    kinds = [e["status"] for e in events(env.c, sid)]
    assert kinds[-2:] == ["concerning", "running"], kinds


def _ok_pids(address: str) -> dict[str, int] | None:
    try:
        return _server_pids(address)
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stopping_the_service_leaves_no_process(env: Env, custom_service: dict[str, Any]) -> None:
    sid, address = custom_service["service_id"], custom_service["access_address"]
    reach(env.c, sid, "running", timeout_s=120)
    pids = wait_for("both servers answer", lambda: _ok_pids(address), timeout_s=60)
    r = env.c.put(f"/v1/{P}/services/{sid}", json={"status": "stopped"})
    assert r.status_code == 200, r.text
    reach(env.c, sid, "stopped", timeout_s=60)
    wait_for(f"user servers {pids} gone", lambda: all(_gone(p) for p in pids.values()), timeout_s=30)
    # uvicorn's own children too: nothing started from the model folders is left
    left = [
        p.pid
        for p in psutil.process_iter(["cwd"])
        if (p.info.get("cwd") or "").startswith(str(env.own)) and not _gone(p.pid)
    ]
    assert left == [], left


def test_a_server_that_never_becomes_healthy_fails_the_service_with_its_log(env: Env) -> None:
    c = env.c
    flaky = env.own / "flaky"
    mid = _model(c, "flaky", flaky, start_command=["python", "server.py"]).json()["model_id"]
    model_status(c, mid, "published")
    (flaky / "ready.txt").unlink()  # broken after validation, as a model folder on a shared disk can be
    sid = create(c, "flaky", [{"model_id": mid, "weight": 100, **CPU}])
    failed = reach(c, sid, "failed", timeout_s=180)
    assert "ready.txt is missing" in failed["error_msg"] and "exited with code 3" in failed["error_msg"]
    assert "Traceback" not in failed["error_msg"], failed["error_msg"]
    assert c.delete(f"/v1/{P}/services/{sid}").status_code == 200
    deadline = time.monotonic() + 60
    while c.get(f"/v1/{P}/services/{sid}").status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.25)
