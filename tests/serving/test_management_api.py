"""The management API's edge over real HTTP: every bad input is a 4xx naming the field (never a 5xx, never a
half-made row), tokens bound to projects, and the error-code table."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtimes.errors import error_table
from serving.registry import open_registry
from serving.settings import Settings
from tests.serving.cp_harness import ControlPlane, start_control_plane, wait_for

P = "default"


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, example_models: Path) -> dict[str, Path]:
    home = tmp_path_factory.mktemp("api-home")
    own = home / "models"
    own.mkdir()
    (own / "out").symlink_to("/etc")  # a symlink out of the allowed roots
    bad_cfg = own / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{not json")
    return {"home": home, "own": own, "examples": example_models}


def _settings(roots: dict[str, Path], home: Path, **kw: Any) -> Settings:
    return Settings(
        home=home,
        model_repository=roots["examples"],
        allowed_roots=os.pathsep.join([str(roots["examples"]), str(roots["own"])]),
        reconcile_interval_s=0.5,
        **kw,
    )


@pytest.fixture(scope="module")
def api(serve_instance: str, roots: dict[str, Path]) -> Iterator[tuple[ControlPlane, str]]:
    """A control plane with one published ONNX model."""
    from serving.dataplane import deploy

    registry = open_registry(None, roots["home"])
    cp = start_control_plane(_settings(roots, roots["home"]), registry)
    body = {
        "model_name": "mlp",
        "model_version": "1.0.0",
        "model_type": "ONNX",
        "source_location": str(roots["examples"] / "mlp-onnx" / "1.0.0"),
    }
    mid = cp.client.post(f"/v1/{P}/models", json=body).json()["model_id"]
    wait_for("published", lambda: cp.client.get(f"/v1/{P}/models/{mid}").json()["model_status"] == "published")
    yield cp, mid
    cp.stop()
    deploy.sync({})
    registry.close()


def _svc(mid: str, **entry: Any) -> dict[str, Any]:
    e = {"model_id": mid, "weight": 100, "specification": "custom", "custom_spec": {"cpu": 0.25}} | entry
    return {"service_name": "svc", "config": [e]}


def _model(**kw: Any) -> dict[str, Any]:
    return {"model_name": "m", "model_version": "1.0.0", "model_type": "ONNX", "source_location": "{examples}"} | kw


MID = "{mid}"
# (method, path, json or raw bytes, query, status, error_code, words the message must contain)
CASES: list[tuple[str, str, Any, dict[str, Any] | None, int, str, list[str]]] = [
    ("POST", "models", b"{nope", None, 400, "EH.0501", ["not valid JSON"]),
    ("POST", "models", [1, 2], None, 400, "EH.0501", ["body"]),
    ("POST", "models", _model(colour="red"), None, 400, "EH.0501", ["colour"]),
    ("POST", "models", _model(model_type="Caffe"), None, 400, "EH.0501", ["model_type"]),
    ("POST", "models", _model(model_version="01.2.3"), None, 400, "EH.0501", ["model_version"]),
    ("POST", "models", _model(model_version="1.2"), None, 400, "EH.0501", ["model_version"]),
    ("POST", "models", _model(model_name="9lives"), None, 400, "EH.0501", ["model_name"]),
    ("POST", "models", {"model_name": "m", "model_version": "1.0.0", "model_type": "ONNX"}, None, 400, "EH.0501",
     ["source_location"]),
    ("POST", "models", _model(source_location="{own}/" + "../" * 12 + "etc"), None, 400, "EH.0504", ["outside"]),
    ("POST", "models", _model(source_location="{own}/out/passwd"), None, 400, "EH.0504", ["outside"]),
    ("POST", "models", _model(source_location="relative/model.onnx"), None, 400, "EH.0504", ["absolute"]),
    ("POST", "models", _model(source_location="{own}/missing.onnx"), None, 400, "EH.0504", ["does not exist"]),
    ("POST", "models", _model(runtime="onnxruntime_0.0.1-tpu"), None, 400, "EH.0505", ["onnxruntime_0.0.1-tpu"]),
    ("POST", "models", _model(source_location="{own}/badcfg"), None, 400, "EH.0102", ["config.json"]),
    ("POST", "models", _model(source_location="{torch}"), None, 400, "EH.0501", ["model_type", "PyTorch"]),
    ("POST", "models", _model(model_type="Custom"), None, 400, "EH.0501", ["start_command"]),
    ("POST", "models", _model(model_type="Custom", start_command=["python", " "]), None, 400, "EH.0501",
     ["start_command"]),
    ("POST", "models", _model(model_type="Custom", start_command=["x"], port=80), None, 400, "EH.0501", ["port"]),
    ("POST", "models", _model(start_command=["python", "serve.py"]), None, 400, "EH.0501", ["only for Custom"]),
    ("GET", "models", None, {"model_type": "ONNX", "not_model_type": "PyTorch"}, 400, "EH.0501", ["not_model_type"]),
    ("GET", "models", None, {"sort_by": "model_name"}, 400, "EH.0501", ["sort_by"]),
    ("GET", "models", None, {"order": "up"}, 400, "EH.0501", ["order"]),
    ("GET", "models", None, {"limit": -1}, 400, "EH.0501", ["limit"]),
    ("GET", "models", None, {"model_status": "bogus"}, 400, "EH.0501", ["model_status"]),
    ("GET", "models/nope", None, None, 404, "EH.0302", ["nope"]),
    ("DELETE", "models/nope", None, None, 404, "EH.0302", ["nope"]),
    ("POST", "services", _svc(MID, weight=90), None, 400, "EH.0501", ["sum to 100", "90"]),
    ("POST", "services", _svc(MID, weight=101), None, 400, "EH.0501", ["config[0].weight"]),
    ("POST", "services", _svc(MID, custom_spec={"cpu": -1}), None, 400, "EH.0501", ["config[0].custom_spec.cpu"]),
    ("POST", "services", _svc(MID, custom_spec={"cpu": 1e9}), None, 400, "EH.0501", ["custom_spec.cpu"]),
    ("POST", "services", _svc(MID, custom_spec={"cpu": 1, "memory": -5}), None, 400, "EH.0501", ["memory"]),
    ("POST", "services", _svc(MID, custom_spec={"cpu": 1, "gpu_p4": 1.5}), None, 400, "EH.0501", ["whole"]),
    ("POST", "services", _svc(MID, instance_count=0), None, 400, "EH.0501", ["instance_count"]),
    ("POST", "services", _svc(MID, custom_spec=None), None, 400, "EH.0501", ["custom_spec"]),
    ("POST", "services", _svc(MID, specification="local.cpu.999u", custom_spec=None), None, 400, "EH.0401",
     ["local.cpu.999u", "local.cpu.1u"]),
    ("POST", "services", _svc("no-such-model"), None, 400, "EH.0501", ["config[0].model_id", "no-such-model"]),
    ("POST", "services", _svc(MID, envs={"1BAD": "x"}), None, 400, "EH.0501", ["1BAD"]),
    ("POST", "services", _svc(MID) | {"infer_type": "edge"}, None, 400, "EH.0501", ["infer_type"]),
    ("POST", "services", _svc(MID) | {"infer_type": "batch"}, None, 409, "EH.0506", ["registered for", "batch"]),
    ("POST", "services", _svc(MID) | {"src_path": "/tmp"}, None, 400, "EH.0501", ["only read with infer_type batch"]),
    ("POST", "services", _svc(MID) | {"service_name": "9bad"}, None, 400, "EH.0501", ["service_name"]),
    ("POST", "services", _svc(MID) | {"schedule": [{"type": "stop", "time_unit": "WEEKS", "duration": 1}]}, None,
     400, "EH.0501", ["schedule[0].time_unit"]),
    ("POST", "services", {"service_name": "svc", "config": []}, None, 400, "EH.0501", ["config"]),
    ("GET", "services", None, {"status": "bogus"}, 400, "EH.0501", ["status"]),
    ("GET", "services", None, {"sort_by": "nope"}, 400, "EH.0501", ["sort_by"]),
    ("GET", "services/nope", None, None, 404, "EH.0302", ["nope"]),
    ("PUT", "services/nope", {"status": "stopped"}, None, 404, "EH.0302", ["nope"]),
    ("DELETE", "services/nope", None, None, 404, "EH.0302", ["nope"]),
    ("GET", "services/nope/events", None, None, 404, "EH.0302", ["nope"]),
    ("GET", "/v2/{p}/pools/elsewhere/nodes", None, None, 404, "EH.0402", ["pool not found"]),
    ("GET", "/v2/{p}/pools/default/nodes", None, {"continue": "zz"}, 400, "EH.0501", ["continue"]),
]  # fmt: skip


def _fill(value: Any, subst: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**subst)
    if isinstance(value, dict):
        return {k: _fill(v, subst) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, subst) for v in value]
    return value


@pytest.mark.parametrize(("method", "path", "body", "query", "status", "code", "words"), CASES)
def test_bad_input_is_a_4xx_naming_the_problem(
    api: tuple[ControlPlane, str],
    roots: dict[str, Path],
    method: str,
    path: str,
    body: Any,
    query: dict[str, Any] | None,
    status: int,
    code: str,
    words: list[str],
) -> None:
    cp, mid = api
    subst = {
        "mid": mid,
        "p": P,
        "own": str(roots["own"]),
        "examples": str(roots["examples"] / "mlp-onnx" / "1.0.0"),
        "torch": str(roots["examples"] / "mlp-torchscript" / "1.0.0"),
    }
    before = [cp.client.get(f"/v1/{P}/{kind}").json()["total_count"] for kind in ("models", "services")]
    url = path.format(**subst) if path.startswith("/") else f"/v1/{P}/{path}"
    kwargs: dict[str, Any] = {"params": query}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = _fill(body, subst)
    r = cp.client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error_code"] == code, err
    for word in words:
        assert word in err["error_msg"], err
    after = [cp.client.get(f"/v1/{P}/{kind}").json()["total_count"] for kind in ("models", "services")]
    assert after == before  # nothing half-made


@pytest.fixture(scope="module")
def locked(serve_instance: str, roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A control plane with auth on: two env tokens and one made by `enginehouse token create`. No reconciler
    (the `api` control plane owns this process's Serve applications)."""
    home = tmp_path_factory.mktemp("locked-home")
    env = {**os.environ, "ENGINEHOUSE_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "token", "create", "--project", "third", "--description", "ci"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    cli_token = proc.stdout.strip()
    registry = open_registry(None, home)
    cp = start_control_plane(
        _settings(roots, home, auth_tokens="default:tok-default,other:tok-other"), registry, reconcile=False
    )
    yield cp, cli_token, home
    cp.stop()
    registry.close()


@pytest.mark.parametrize(
    ("headers", "project", "status", "code"),
    [
        ({}, "default", 401, "EH.0502"),
        ({"X-Auth-Token": "not-a-token"}, "default", 401, "EH.0502"),
        ({"X-Auth-Token": "tok-other"}, "default", 403, "EH.0503"),
        ({"X-Auth-Token": "tok-default"}, "default", 200, None),
        ({"Authorization": "OAuth tok-default"}, "default", 200, None),
        ({"X-Auth-Token": "tok-other"}, "other", 200, None),
        ({"X-Auth-Token": "{cli}"}, "third", 200, None),
        ({"X-Auth-Token": "{cli}"}, "default", 403, "EH.0503"),
    ],
)
def test_tokens_open_their_own_project_only(locked: Any, headers: dict, project: str, status: int, code: Any) -> None:
    cp, cli_token, _ = locked
    headers = {k: v.format(cli=cli_token) for k, v in headers.items()}
    for path in (f"/v1/{project}/models", f"/v1/{project}/services", f"/v2/{project}/pools"):
        r = cp.client.get(path, headers=headers)
        assert r.status_code == status, (path, r.text)
        if code:
            assert r.json()["error_code"] == code
    assert cp.client.get("/healthz").status_code == 200  # liveness needs no token


def test_tokens_are_stored_hashed(locked: Any) -> None:
    _, cli_token, home = locked
    with sqlite3.connect(home / "registry.db") as db:
        stored = [row[0] for row in db.execute("SELECT token_hash FROM tokens")]
    assert len(stored) == 1 and stored[0] != cli_token and len(stored[0]) == 64
    assert cli_token not in (home / "registry.db").read_bytes().decode("latin-1")


def test_update_while_deleting_is_refused(locked: Any, roots: dict[str, Path]) -> None:
    cp, _, _ = locked
    h = {"X-Auth-Token": "tok-default"}
    reg = cp.manager.registry
    mid = reg.add_model(
        P,
        model_name="mlp",
        model_version="1.0.0",
        model_type="ONNX",
        model_status="published",
        engine_config={"model_dir": str(roots["examples"] / "mlp-onnx" / "1.0.0"), "config": {"engine": "ONNX"}},
    )
    sid = cp.client.post(f"/v1/{P}/services", json=_svc(mid), headers=h).json()["service_id"]
    assert cp.client.delete(f"/v1/{P}/services/{sid}", headers=h).status_code == 200
    r = cp.client.put(f"/v1/{P}/services/{sid}", json={"description": "late"}, headers=h)
    assert r.status_code == 409 and r.json()["error_code"] == "EH.0507"


# Codes produced on the data plane or by engines, and the test that reaches each.
ELSEWHERE = {
    "EH.0103": "tests/serving/test_replica.py::test_bad_input_is_4xx_naming_the_problem",
    "EH.0201": "tests/serving/test_replica.py::test_instances_and_pinned_version",
    "EH.0202": "tests/serving/test_dataplane.py::test_body_over_the_limit_is_413_and_unknown_paths_404",
    "EH.0203": "tests/serving/test_dataplane.py::test_body_over_the_limit_is_413_and_unknown_paths_404",
    "EH.0204": "tests/serving/test_overload.py::test_past_the_queue_bound_requests_get_503_with_retry_after_at_once",
    "EH.0205": "tests/serving/test_overload.py::test_a_request_past_its_timeout_gets_504_and_never_reaches_the_engine",
    "EH.0301": "tests/serving/test_controlplane.py::test_models_publish_with_signature_size_and_list",
    "EH.0509": "tests/serving/test_fuzz.py::test_management_known_inputs[404-shape]",
    "EH.0510": "tests/serving/test_fuzz.py::test_management_known_inputs[405-shape]",
    "EH.0511": "tests/test_security.py::test_management_bodies_are_size_limited_like_inference_bodies",
    "EH.0303": "tests/serving/test_controlplane.py::test_three_engine_service_runs_splits_and_answers",
    "EH.0506": "tests/serving/test_controlplane.py::test_a_model_that_does_not_load_fails_with_the_engine_reason",
    "EH.0101": "tests/runtimes/test_catalogue.py (engine hidden in a subprocess)",
    "EH.0104": "tests/runtimes/test_engine_contract.py (predict before load)",
    "EH.0105": "tests/runtimes/test_engine_contract.py (engine raises)",
    "EH.0001": "never sent on purpose: the code of an unexpected failure",
}


def test_every_error_code_has_a_status_and_a_test() -> None:
    import serving.dataplane.replica  # noqa: F401  (registers the data plane's codes)

    table = error_table()
    here = {case[5] for case in CASES} | {"EH.0502", "EH.0503", "EH.0507"}
    assert set(table) == here | set(ELSEWHERE), sorted(set(table) ^ (here | set(ELSEWHERE)))
    assert all(400 <= status < 600 for status, _ in table.values())


def test_metrics_want_a_token_when_auth_is_on(locked: Any) -> None:
    cp, _, _ = locked
    assert cp.client.get("/metrics").status_code == 401
    r = cp.client.get("/metrics", headers={"Authorization": "Bearer tok-other"})  # Prometheus's authorization
    assert r.status_code == 200 and "enginehouse_metrics_source_up" in r.text
