"""The control plane end to end over real HTTP against the session's real Ray Serve: models, services,
lifecycle (failed load, waiting, stop/start, auto-stop, a killed replica, delete), restart."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference
from serving.controlplane.manager import disk_size
from serving.registry import open_registry
from serving.settings import Settings
from tests.serving.cp_harness import (
    ControlPlane,
    cp_settings,
    create,
    events,
    model_status,
    reach,
    register,
    service,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.slow
P = "default"
X = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
OIP = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
CPU = {"specification": "custom", "custom_spec": {"cpu": 0.25}}


@dataclass
class Env:
    """The module's control plane (replaced by the restart test) and its folders."""

    cp: ControlPlane
    settings: Settings
    home: Path
    models_dir: Path
    started: float

    @property
    def c(self) -> httpx.Client:
        return self.cp.client


@pytest.fixture(scope="module")
def env(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("cp-home")
    own = home / "models"
    own.mkdir()
    settings = cp_settings(serve_instance, example_models, home, own)
    registry = open_registry(None, home)
    e = Env(start_control_plane(settings, registry), settings, home, own, time.monotonic())
    yield e
    e.cp.stop()
    deploy.sync({})  # leave the session's Serve as we found it
    registry.close()


@pytest.fixture(scope="module")
def models(env: Env, example_models: Path) -> dict[str, str]:
    ids = {
        "onnx": register(env.c, "mlp-onnx", example_models / "mlp-onnx" / "1.0.0", "ONNX"),
        "ts": register(env.c, "mlp-ts", example_models / "mlp-torchscript" / "1.0.0", "PyTorch", "2.0.0"),
        "tf": register(env.c, "mlp-tf", example_models / "mlp-savedmodel" / "1.0.0", "TensorFlow", "3.0.0"),
    }
    for mid in ids.values():
        model_status(env.c, mid, "published")
    return ids


@pytest.fixture(scope="module")
def autostop(env: Env, models: dict[str, str]) -> str:
    """A service that stops itself one minute after it runs; checked by the module's last test."""
    return create(
        env.c,
        "autostop",
        [{"model_id": models["onnx"], "weight": 100, **CPU}],
        schedule=[{"type": "stop", "time_unit": "MINUTES", "duration": 1}],
    )


@pytest.fixture(scope="module")
def small(env: Env, models: dict[str, str], autostop: str) -> str:
    sid = create(env.c, "small", [{"model_id": models["onnx"], "weight": 100, **CPU}])
    reach(env.c, sid, "running")
    return sid


def test_models_publish_with_signature_size_and_list(env: Env, models: dict[str, str], example_models: Path) -> None:
    m = env.c.get(f"/v1/{P}/models/{models['onnx']}").json()
    assert m["model_status"] == "published" and m["model_type"] == "ONNX"
    assert m["model_size"] == disk_size(example_models / "mlp-onnx" / "1.0.0") > 0
    assert m["input_params"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert m["runtime"].startswith("onnxruntime_")
    listed = env.c.get(f"/v1/{P}/models", params={"model_name": "mlp", "sort_by": "model_version", "order": "asc"})
    assert [x["model_version"] for x in listed.json()["models"]] == ["1.0.0", "2.0.0", "3.0.0"]
    only = env.c.get(f"/v1/{P}/models", params={"not_model_type": "ONNX", "limit": 1}).json()
    assert only["total_count"] == 2 and only["count"] == 1 and only["models"][0]["model_type"] != "ONNX"
    dup = env.c.post(
        f"/v1/{P}/models",
        json={
            "model_name": "mlp-onnx",
            "model_version": "1.0.0",
            "model_type": "ONNX",
            "source_location": str(example_models / "mlp-onnx" / "1.0.0"),
        },
    )
    assert dup.status_code == 409 and dup.json()["error_code"] == "EH.0301"


def test_three_engine_service_runs_splits_and_answers(env: Env, models: dict[str, str], autostop: str) -> None:
    sid = create(
        env.c,
        "three",
        [
            {"model_id": models["onnx"], "weight": 50, **CPU},
            {"model_id": models["ts"], "weight": 30, **CPU},
            {"model_id": models["tf"], "weight": 20, **CPU},
        ],
        description="ONNX, TorchScript and SavedModel",
    )
    first = service(env.c, sid)
    assert first["status"] in ("deploying", "running") and "access_address" in first
    s = reach(env.c, sid, "running")
    assert s["access_address"] == f"http://127.0.0.1:{env.settings.data_port}/v1/infers/{sid}"
    assert {"publish_at", "update_time", "transition_at", "operation_time", "invocation_times", "failed_times"} <= set(
        s
    )
    assert [(c["model_version"], c["weight"], c["status"]) for c in s["config"]] == [
        ("1.0.0", 50, "running"),
        ("2.0.0", 30, "running"),
        ("3.0.0", 20, "running"),
    ]
    seen: dict[str, int] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(90):
            r = client.post(s["access_address"], json=OIP)
            assert r.status_code == 200, r.text
            out = r.json()
            np.testing.assert_allclose(
                np.asarray(out["outputs"][0]["data"], np.float32).reshape(3, 3), mlp_reference(X), atol=1e-4
            )
            seen[out["model_version"]] = seen.get(out["model_version"], 0) + 1
    assert set(seen) == {"1.0.0", "2.0.0", "3.0.0"}, seen
    kinds = [e["status"] for e in events(env.c, sid)]
    assert kinds[0] == "deploying" and kinds[-1] == "running"

    # weights change live: the same replicas, all new traffic on 3.0.0 within a few seconds
    r = env.c.put(
        f"/v1/{P}/services/{sid}",
        json={
            "config": [
                {"model_id": models["onnx"], "weight": 0, **CPU},
                {"model_id": models["ts"], "weight": 0, **CPU},
                {"model_id": models["tf"], "weight": 100, **CPU},
            ]
        },
    )
    assert r.status_code == 200, r.text

    def all_tf() -> bool:
        versions = []
        for _ in range(20):
            r = httpx.post(s["access_address"], json=OIP, timeout=30)
            assert r.status_code == 200, (r.status_code, r.headers, r.text)  # no request lost while weights move
            versions.append(r.json()["model_version"])
        return set(versions) == {"3.0.0"}

    wait_for("weights 0/0/100", all_tf, timeout_s=20)
    assert service(env.c, sid)["status"] == "running"

    # a model in use cannot be deleted
    r = env.c.delete(f"/v1/{P}/models/{models['ts']}")
    assert r.status_code == 409 and r.json()["error_code"] == "EH.0303" and "three" in r.json()["error_msg"]

    r = env.c.delete(f"/v1/{P}/services/{sid}")
    assert r.status_code == 200
    wait_for("service gone", lambda: env.c.get(f"/v1/{P}/services/{sid}").status_code == 404, timeout_s=60)


def test_a_model_that_does_not_load_fails_with_the_engine_reason(env: Env) -> None:
    bad = env.models_dir / "garbage.onnx"
    bad.write_bytes(b"this is not an onnx file")
    mid = register(env.c, "garbage", bad, "ONNX")
    m = model_status(env.c, mid, "failed")
    assert "garbage" in m["error_msg"] and "could not be loaded" in m["error_msg"]
    r = env.c.post(
        f"/v1/{P}/services", json={"service_name": "nope", "config": [{"model_id": mid, "weight": 100, **CPU}]}
    )
    assert r.status_code == 409 and r.json()["error_code"] == "EH.0506"
    assert env.c.get(f"/v1/{P}/services", params={"service_name": "nope"}).json()["total_count"] == 0


def test_a_replica_that_cannot_load_fails_the_service_then_recovers(env: Env, example_models: Path) -> None:
    folder = env.models_dir / "flaky"
    shutil.copytree(example_models / "mlp-onnx" / "1.0.0", folder)
    mid = register(env.c, "flaky", folder, "ONNX")
    model_status(env.c, mid, "published")
    good = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(b"corrupted after validation")
    sid = create(env.c, "flaky", [{"model_id": mid, "weight": 100, **CPU}])
    s = reach(env.c, sid, "failed", timeout_s=180)
    assert "could not be loaded" in s["error_msg"] and "model.onnx" in s["error_msg"], s["error_msg"]
    assert "failed" in [e["status"] for e in events(env.c, sid)]
    (folder / "model.onnx").write_bytes(good)
    assert env.c.put(f"/v1/{P}/services/{sid}", json={"status": "running"}).status_code == 200
    reach(env.c, sid, "running")
    env.c.delete(f"/v1/{P}/services/{sid}")


def test_a_service_the_cluster_cannot_hold_waits_and_says_why(env: Env, models: dict[str, str]) -> None:
    sid = create(
        env.c,
        "huge",
        [{"model_id": models["onnx"], "weight": 100, "specification": "custom", "custom_spec": {"cpu": 64}}],
    )
    s = reach(env.c, sid, "waiting", timeout_s=20)
    assert "CPU 64" in s["error_msg"] and "CPU 2" in s["error_msg"]
    assert env.c.delete(f"/v1/{P}/services/{sid}").status_code == 200
    wait_for("huge gone", lambda: env.c.get(f"/v1/{P}/services/{sid}").status_code == 404, timeout_s=60)


def test_stop_and_start(env: Env, small: str) -> None:
    from ray import serve

    r = env.c.put(f"/v1/{P}/services/{small}", json={"status": "stopped"})
    assert r.status_code == 200 and r.json()["status"] in ("stopping", "stopped")
    reach(env.c, small, "stopped", timeout_s=60)
    wait_for("application removed", lambda: small not in serve.status().applications, timeout_s=60)
    assert env.c.put(f"/v1/{P}/services/{small}", json={"status": "running"}).status_code == 200
    s = reach(env.c, small, "running")
    assert httpx.post(s["access_address"], json={"instances": [[1, 2, 3, 4]]}, timeout=30).status_code == 200
    kinds = [e["status"] for e in events(env.c, small)]
    assert kinds[-4:] == ["stopping", "stopped", "deploying", "running"], kinds


def _replica_pid(service_id: str) -> int:
    from ray._private import state

    prefix = f"SERVE_REPLICA::{service_id}#"
    alive = [a for a in state.actors().values() if (a.get("Name") or "").startswith(prefix) and a["State"] == "ALIVE"]
    assert alive, f"no live replica of {service_id}"
    return int(alive[0]["Pid"])


def test_a_killed_replica_makes_the_service_concerning_then_running(env: Env, small: str) -> None:
    reach(env.c, small, "running")
    os.kill(_replica_pid(small), signal.SIGKILL)
    reach(env.c, small, "concerning", timeout_s=60)
    reach(env.c, small, "running", timeout_s=120)
    kinds = [e["status"] for e in events(env.c, small)]
    assert kinds[-2:] == ["concerning", "running"], kinds


def test_restart_keeps_services_history_and_counters(env: Env, small: str) -> None:
    s = reach(env.c, small, "running")
    start = (s["invocation_times"], s["failed_times"])

    def calls(good: int, bad: int) -> None:
        for body, n, code in (({"instances": [[1, 2, 3, 4]]}, good, 200), ({"instances": [[1, 2]]}, bad, 400)):
            for _ in range(n):
                assert httpx.post(s["access_address"], json=body, timeout=30).status_code == code

    def counts_are(expected: tuple[int, int]) -> bool:
        now = service(env.c, small)
        return (now["invocation_times"] - start[0], now["failed_times"] - start[1]) == expected

    calls(4, 3)
    wait_for("7 calls, 3 failed", lambda: counts_are((7, 3)), timeout_s=30)
    before = service(env.c, small)
    history = events(env.c, small)
    env.cp.stop()
    env.cp = start_control_plane(env.settings, env.cp.manager.registry)
    after = service(env.c, small)
    assert after["status"] == "running" and counts_are((7, 3))
    assert after["publish_at"] == before["publish_at"] and events(env.c, small)[: len(history)] == history
    calls(2, 0)  # counting goes on exactly across the restart
    wait_for("9 calls, 3 failed", lambda: counts_are((9, 3)), timeout_s=30)


def test_specifications_and_pools(env: Env) -> None:
    specs = env.c.get(f"/v1/{P}/services/specifications").json()["specifications"]
    names = [s["specification"] for s in specs]
    assert "local.cpu.1u" in names and "custom" in names and not any("gpu" in n for n in names)
    nodes = env.c.get(f"/v2/{P}/pools/default/nodes").json()
    assert nodes["kind"] == "NodeList" and nodes["items"][0]["status"]["resources"]["cpu"] == "2000m"
    r = env.c.get(f"/v2/{P}/pools/nope/nodes")
    assert r.status_code == 404 and r.json()["error_msg"] == "pool not found"


def test_zz_autostop_stops_the_service_on_time(env: Env, autostop: str) -> None:
    s = reach(env.c, autostop, "stopped", timeout_s=150)
    assert s["schedule"] == [{"type": "stop", "time_unit": "MINUTES", "duration": 1}]
    ev = events(env.c, autostop)
    running_at = next(e["occur_time"] for e in ev if e["status"] == "running")
    assert s["due_time"] == pytest.approx(running_at + 60_000, abs=2_000)
    stopping = next(e for e in ev if e["status"] == "stopping")
    assert "auto-stop" in stopping["event_info"] and stopping["occur_time"] >= s["due_time"]
