"""Batch services through the management API, on the session's Ray: folders of inputs (file and csv mapping,
bad inputs planted), every result checked against the engine called directly, the ModelArts manifest, the
service's progress and counts, stop mid-run, resume after a control-plane restart with every input exactly
once, and bad paths refused before anything runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.registry import open_registry
from tests.serving.cp_harness import (
    ControlPlane,
    cp_settings,
    events,
    model_status,
    reach,
    start_control_plane,
    wait_for,
)

P = "default"
ENTRY = {"weight": 100, "specification": "custom", "custom_spec": {"cpu": 0.5}}


class Env:
    def __init__(self, cp: ControlPlane, settings: Any, registry: Any, data: Path, mid: str, engine: Any) -> None:
        self.cp, self.settings, self.registry, self.data, self.mid, self.engine = (
            cp,
            settings,
            registry,
            data,
            mid,
            engine,
        )

    def create(self, name: str, src: Path, dest: Path, **extra: Any) -> str:
        body = {
            "service_name": name,
            "infer_type": "batch",
            "config": [{"model_id": self.mid, **ENTRY, **extra.pop("entry", {})}],
            "src_path": str(src),
            "dest_path": str(dest),
            **extra,
        }
        r = self.cp.client.post(f"/v1/{P}/services", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["service_id"])


def _engine(model_dir: Path) -> Any:
    from runtimes.registry import load_model

    adapter = asyncio.run(load_model(model_dir))

    def run(x: np.ndarray) -> np.ndarray:
        return asyncio.run(adapter.infer({"x": x}))["y"]

    return run


@pytest.fixture(scope="module")
def env(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("batch-home")
    data = home / "data"
    data.mkdir()
    settings = cp_settings(serve_instance, example_models, home, data)
    registry = open_registry(None, home)
    cp = start_control_plane(settings, registry)
    model_dir = example_models / "mlp-onnx" / "1.0.0"
    r = cp.client.post(
        f"/v1/{P}/models",
        json={
            "model_name": "mlp",
            "model_version": "1.0.0",
            "model_type": "ONNX",
            "source_location": str(model_dir),
            "install_type": ["real-time", "batch"],
        },
    )
    mid = r.json()["model_id"]
    model_status(cp.client, mid, "published")
    e = Env(cp, settings, registry, data, mid, _engine(model_dir))
    yield e
    e.cp.stop()
    deploy.sync({})
    registry.close()


def _manifest(dest: Path, sid: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (dest / f"infer-result-{sid}.manifest").read_text().splitlines()]


def _file_folder(root: Path, n: int, bad: bool = True) -> tuple[Path, dict[str, np.ndarray], set[str]]:
    """n inputs as .npy (one row) and .json (OIP v2) in sub-folders, plus planted bad ones."""
    src = root / "in"
    rng = np.random.default_rng(7)
    good: dict[str, np.ndarray] = {}
    for i in range(n):
        x = rng.standard_normal(4).astype(np.float32)
        rel = f"part{i % 3}/x{i:04d}" + (".npy" if i % 2 else ".json")
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".npy"):
            np.save(src / rel, x)
        else:
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]}
            (src / rel).write_text(json.dumps(body))
        good[rel] = x
    planted = set()
    if bad:
        (src / "bad").mkdir()
        (src / "bad/corrupt.npy").write_bytes(b"\x93NUMPY this is not an array")
        np.save(src / "bad/wrong-shape.npy", np.zeros(7, np.float32))
        (src / "bad/not-json.json").write_text("{nope")
        (src / "bad/notes.docx").write_bytes(b"PK\x03\x04")
        planted = {"bad/corrupt.npy", "bad/wrong-shape.npy", "bad/not-json.json", "bad/notes.docx"}
    return src, good, planted


def _check_results(env: Env, dest: Path, sid: str, good: dict[str, np.ndarray], planted: set[str]) -> None:
    lines = _manifest(dest, sid)
    sources = [line["source"] for line in lines]
    assert sorted(sources) == sorted([*good, *planted]), "every input exactly once"
    for line in lines:
        if line["source"] in planted:
            assert line["result"] == "FAILED" and line["error_message"], line
            continue
        assert line["result"] == "SUCCESSFUL", line
        out = json.loads(Path(line["inference-loc"]).read_text())["outputs"][0]
        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, env.engine(good[line["source"]][None, :]), rtol=1e-5, atol=1e-6)


def test_file_mapping_runs_to_finished_with_every_result_checked(env: Env, tmp_path: Path) -> None:
    src, good, planted = _file_folder(env.data / "files", 300)
    dest = env.data / "out-files"
    sid = env.create("files", src, dest)
    done = reach(env.cp.client, sid, "finished", timeout_s=240)
    assert (done["total"], done["succeeded"], done["failed"], done["progress"]) == (304, 300, 4, 100)
    assert (done["invocation_times"], done["failed_times"]) == (304, 4)
    entry = done["config"][0]
    assert entry["src_path"] == str(src) and entry["dest_path"] == str(dest)
    assert entry["mapping_type"] == "file" and entry["finished_time"] >= entry["start_time"]
    reasons = {line["source"]: line.get("error_message", "") for line in _manifest(dest, sid)}
    assert "unsupported file type" in reasons["bad/notes.docx"]
    assert "shape" in reasons["bad/wrong-shape.npy"]
    _check_results(env, dest, sid, good, planted)
    assert "finished" in [e["status"] for e in events(env.cp.client, sid)]


def test_csv_mapping_with_a_rule(env: Env, tmp_path: Path) -> None:
    src = env.data / "csv-in"
    src.mkdir()
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((120, 4)).astype(np.float32)
    lines = ["id,a,b,c,d,label"] + [f"{i},{r[0]},{r[1]},{r[2]},{r[3]},x" for i, r in enumerate(rows)]
    lines[11] = "10,1.0,2.0,3.0"  # row 11: columns c/d missing
    lines[21] = "20,1.0,two,3.0,4.0,x"  # row 21: not a number
    (src / "data.csv").write_text("\n".join(lines) + "\n")
    dest = env.data / "csv-out"
    rule = {"inputs": {"x": ["a", "b", "c", "d"]}}
    sid = env.create("csv", src, dest, mapping_type="csv", mapping_rule=rule)
    done = reach(env.cp.client, sid, "finished", timeout_s=240)
    assert (done["total"], done["succeeded"], done["failed"]) == (120, 118, 2)
    assert done["config"][0]["mapping_rule"] == rule
    by_source = {line["source"]: line for line in _manifest(dest, sid)}
    assert by_source["data.csv#11"]["result"] == "FAILED" and by_source["data.csv#21"]["result"] == "FAILED"
    for row in (1, 50, 120):
        out = json.loads(Path(by_source[f"data.csv#{row}"]["inference-loc"]).read_text())["outputs"][0]
        want = env.engine(rows[row - 1][None, :])[0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32), want, rtol=1e-5)


def test_bad_requests_are_refused_before_anything_runs(env: Env, tmp_path: Path) -> None:
    src, _, _ = _file_folder(env.data / "refuse", 3, bad=False)
    escape = env.data / "escape"
    escape.symlink_to(tmp_path)  # under the root by name, outside it once resolved
    c = env.cp.client
    base = {"service_name": "nope", "infer_type": "batch", "config": [{"model_id": env.mid, **ENTRY}]}
    cases = [
        ({"src_path": str(env.data / "missing"), "dest_path": str(env.data / "o")}, 400, "src_path"),
        ({"src_path": str(src), "dest_path": str(src / "results")}, 400, "inside src_path"),
        ({"src_path": str(src), "dest_path": str(src)}, 400, "same folder"),
        ({"src_path": str(tmp_path), "dest_path": str(env.data / "o")}, 400, "outside the allowed roots"),
        ({"src_path": str(escape), "dest_path": str(env.data / "o")}, 400, "outside the allowed roots"),
        ({"src_path": str(src), "dest_path": "/etc/enginehouse-out"}, 400, "outside the allowed roots"),
        ({"src_path": str(src), "dest_path": "relative/out"}, 400, "absolute"),
        ({"dest_path": str(env.data / "o")}, 400, "src_path: required"),
        ({"src_path": str(src), "dest_path": str(env.data / "o"), "mapping_type": "xml"}, 400, "mapping_type"),
        ({"src_path": str(src), "dest_path": str(env.data / "o"), "mapping_rule": {"inputs": {}}}, 400, "only read"),
        (
            {
                "src_path": str(src),
                "dest_path": str(env.data / "o"),
                "mapping_type": "csv",
                "mapping_rule": {"inputs": {"nope": ["a"]}},
            },
            400,
            "mapping_rule",
        ),
    ]
    for extra, status, reason in cases:
        r = c.post(f"/v1/{P}/services", json=base | extra)
        assert r.status_code == status and reason in r.json()["error_msg"], (extra, r.text)
    two = base | {"src_path": str(src), "dest_path": str(env.data / "o")}
    two["config"] = [{"model_id": env.mid, **ENTRY, "weight": 50}, {"model_id": env.mid, **ENTRY, "weight": 50}]
    assert c.post(f"/v1/{P}/services", json=two).status_code == 400
    assert c.get(f"/v1/{P}/services", params={"service_name": "nope"}).json()["count"] == 0  # nothing half-made


def _lines(dest: Path, sid: str) -> int:
    path = dest / f"infer-result-{sid}.manifest"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_stop_mid_run_then_resume_after_a_control_plane_restart(env: Env, tmp_path: Path) -> None:
    import ray

    from serving.controlplane.batch import NAMESPACE, runner_name

    src, good, planted = _file_folder(env.data / "big", 2000, bad=False)
    dest = env.data / "big-out"
    # one row per engine call: slow enough to catch the job half-way
    sid = env.create("big", src, dest, entry={"max_batch_size": 1})
    wait_for("the job half-way", lambda: 0 < _lines(dest, sid) < 1000, timeout_s=180, every_s=0.05)
    r = env.cp.client.put(f"/v1/{P}/services/{sid}", json={"status": "stopped"})
    assert r.status_code == 200
    stopped = reach(env.cp.client, sid, "stopped", timeout_s=60)
    assert 0 < stopped["succeeded"] < 2000
    at_stop = _lines(dest, sid)
    assert env.cp.client.put(f"/v1/{P}/services/{sid}", json={"status": "running"}).status_code == 200
    wait_for("the job going again", lambda: _lines(dest, sid) > at_stop + 50, timeout_s=180, every_s=0.05)

    # the control plane goes down with its process: the runner and Ray Data's actors go with it
    env.cp.stop()
    ray.kill(ray.get_actor(runner_name(sid), namespace=NAMESPACE), no_restart=True)
    interrupted = _lines(dest, sid)
    assert interrupted < 2000, "interrupted half-way"
    env.cp = start_control_plane(env.settings, env.registry)
    done = reach(env.cp.client, sid, "finished", timeout_s=300)
    assert (done["total"], done["succeeded"], done["failed"]) == (2000, 2000, 0)
    _check_results(env, dest, sid, good, planted)  # every input exactly once, every result right
