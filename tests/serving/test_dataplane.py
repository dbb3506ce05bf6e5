"""The data plane through the control plane on a real Ray Serve: exact counters over several replicas,
dynamic batching that never mixes requests, the official tritonclient (binary and JSON), bad payloads."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference
from serving.registry import Registry, open_registry
from tests.serving.cp_harness import (
    ControlPlane,
    cp_settings,
    create,
    model_status,
    reach,
    register,
    service,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.slow
P = "default"
CPU = {"specification": "custom", "custom_spec": {"cpu": 0.25}}


@pytest.fixture(scope="module")
def cp(serve_instance: str, example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("dp-home")
    (home / "models").mkdir()
    settings = cp_settings(serve_instance, example_models, home, home / "models")
    registry = open_registry(None, home)
    c = start_control_plane(settings, registry)
    yield c
    c.stop()
    deploy.sync({})
    registry.close()


@pytest.fixture(scope="module")
def svc(cp: ControlPlane, example_models: Path) -> dict[str, Any]:
    """Two versions (ONNX 1.0.0, TorchScript 2.0.0) at 50/50 on two replicas, batching up to 8 rows."""
    onnx = register(cp.client, "dp-onnx", example_models / "mlp-onnx" / "1.0.0", "ONNX")
    ts = register(cp.client, "dp-ts", example_models / "mlp-torchscript" / "1.0.0", "PyTorch", "2.0.0")
    for mid in (onnx, ts):
        model_status(cp.client, mid, "published")
    entry = {**CPU, "instance_count": 2, "max_batch_size": 8, "batch_timeout_ms": 2}
    sid = create(
        cp.client,
        "dp",
        [{"model_id": onnx, "weight": 50, **entry}, {"model_id": ts, "weight": 50, **entry}],
    )
    return reach(cp.client, sid, "running")


def _oip(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def test_counters_are_exact_over_replicas_and_versions(cp: ControlPlane, svc: dict[str, Any]) -> None:
    url = svc["access_address"]
    before = service(cp.client, svc["service_id"])
    registry: Registry = cp.manager.registry
    counts_before = registry.get_counts(svc["service_id"])
    rng = np.random.default_rng(3)
    good = [(_oip(rng.standard_normal((1 + i % 3, 4)).astype(np.float32)), {}) for i in range(120)]
    bad_shape = {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}
    bad = [(bad_shape, {"X-Model-Version": "1.0.0"})] * 13 + [(bad_shape, {"X-Model-Version": "2.0.0"})] * 7
    unknown = [({"instances": [[1, 2, 3, 4]]}, {"X-Model-Version": "9.9.9"})] * 5

    def send(item: tuple[dict[str, Any], dict[str, str]]) -> tuple[int, str | None]:
        body, headers = item
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        return r.status_code, r.json().get("model_version") if r.status_code == 200 else None

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, good + bad + unknown))
    assert sorted({s for s, _ in results}) == [200, 400, 404]
    by_version = Counter(v for s, v in results if s == 200)
    assert set(by_version) == {"1.0.0", "2.0.0"}
    expected = {
        "1.0.0": (by_version["1.0.0"] + 13, 13),
        "2.0.0": (by_version["2.0.0"] + 7, 7),
        "": (5, 5),  # no version could be chosen, still a call that reached the service
    }

    def settled() -> bool:
        now = registry.get_counts(svc["service_id"])
        got = {
            v: (now[v][0] - counts_before.get(v, (0, 0))[0], now[v][1] - counts_before.get(v, (0, 0))[1]) for v in now
        }
        return got == expected

    wait_for(f"counters {expected}", settled, timeout_s=30)
    after = service(cp.client, svc["service_id"])
    assert after["invocation_times"] - before["invocation_times"] == len(results)
    assert after["failed_times"] - before["failed_times"] == 25


def test_concurrent_requests_of_different_sizes_are_never_mixed(svc: dict[str, Any]) -> None:
    url = svc["access_address"]
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 4, 4)).astype(np.float32) for i in range(96)]

    def send(x: np.ndarray) -> np.ndarray:
        r = httpx.post(url, json=_oip(x), timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    with ThreadPoolExecutor(24) as pool:
        ys = list(pool.map(send, xs))
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, mlp_reference(x), atol=1e-4)


def test_concurrent_single_rows_are_batched(svc: dict[str, Any]) -> None:
    url = svc["access_address"]
    stats_url = f"{url}/v2/models/dp/versions/1.0.0/stats"
    x = np.ones((1, 4), np.float32)
    with ThreadPoolExecutor(24) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.post(url, json=_oip(x), headers={"X-Model-Version": "1.0.0"}, timeout=60).status_code,
                range(240),
            )
        )
    assert codes == [200] * 240
    sizes: set[int] = set()
    for _ in range(10):  # each answer is one replica's; ask a few times to see both
        stats = httpx.get(stats_url, timeout=30).json()["model_stats"][0]
        assert stats["version"] == "1.0.0" and stats["inference_count"] >= stats["execution_count"]
        sizes |= {b["batch_size"] for b in stats["batch_stats"]}
    assert max(sizes) > 1 and max(sizes) <= 8, sizes


def test_tritonclient_binary_and_json(svc: dict[str, Any]) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name = "dp"
    client = triton.InferenceServerClient(url=svc["access_address"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, "2.0.0")
    meta = client.get_model_metadata(name, "1.0.0")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}] and meta["versions"] == ["1.0.0"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    for binary_in in (True, False):
        for binary_out in (True, False):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary_in)
            out = triton.InferRequestedOutput("y", binary_data=binary_out)
            for version in ("1.0.0", "2.0.0"):
                res = client.infer(name, [inp], model_version=version, outputs=[out], request_id="req-7")
                assert res.get_response()["id"] == "req-7" and res.get_response()["model_version"] == version
                np.testing.assert_allclose(res.as_numpy("y"), mlp_reference(x), atol=1e-4)
    wrong = triton.InferInput("x", [2, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 3), np.float32))
    with pytest.raises(InferenceServerException, match=r"shape \[2, 3\] given, \[-1, 4\] expected"):
        client.infer(name, [wrong])
    with pytest.raises(InferenceServerException, match="not nope"):
        client.infer("nope", [wrong])
    client.close()


HEADER = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}'


@pytest.mark.parametrize(
    ("headers", "body", "status", "needle"),
    [
        ({"Inference-Header-Content-Length": "500"}, b'{"inputs": []}', 400, "outside the body"),
        ({"Inference-Header-Content-Length": "abc"}, b"{}", 400, "not an integer"),
        ({"Inference-Header-Content-Length": str(len(HEADER))}, HEADER + b"\x00" * 8, 400, "runs past the body"),
        ({"Inference-Header-Content-Length": str(len(HEADER))}, HEADER + b"\x00" * 20, 400, "trailing bytes"),
        ({"Inference-Header-Content-Length": "10"}, HEADER, 400, "not JSON"),
    ],
)
def test_bad_binary_bodies_are_4xx(
    svc: dict[str, Any], headers: dict[str, str], body: bytes, status: int, needle: str
) -> None:
    r = httpx.post(svc["access_address"], content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_body_over_the_limit_is_413_and_unknown_paths_404(
    cp: ControlPlane, svc: dict[str, Any], example_models: Path
) -> None:
    x = np.zeros((64, 4), np.float32)
    mid = register(cp.client, "dp-small-limit", example_models / "mlp-onnx" / "1.0.0", "ONNX")
    model_status(cp.client, mid, "published")
    sid = create(
        cp.client,
        "dp-limit",
        [{"model_id": mid, "weight": 100, **CPU, "envs": {"ENGINEHOUSE_MAX_BODY_MB": "0.001"}}],
    )
    s = reach(cp.client, sid, "running")
    r = httpx.post(s["access_address"], json=_oip(x), timeout=30)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert httpx.post(s["access_address"], json={"instances": [[1, 2, 3, 4]]}, timeout=30).status_code == 200
    r = httpx.post(f"{svc['access_address']}/v2/models/dp/explain", json={}, timeout=30)
    assert r.status_code == 404 and "not served" in r.json()["error"]
    r = httpx.get(f"{svc['access_address']}/v2/models/dp/versions/7.7.7", timeout=30)
    assert r.status_code == 404 and "7.7.7" in r.json()["error"]
    cp.client.delete(f"/v1/{P}/services/{sid}")


def _put_weights(cp: ControlPlane, svc: dict[str, Any], weights: tuple[int, int]) -> None:
    config = [
        {
            k: c[k]
            for k in (
                "model_id",
                "specification",
                "custom_spec",
                "instance_count",
                "max_batch_size",
                "batch_timeout_ms",
            )
        }
        | {"weight": w}
        for c, w in zip(svc["config"], weights, strict=True)
    ]
    r = cp.client.put(f"/v1/{P}/services/{svc['service_id']}", json={"config": config})
    assert r.status_code == 200, r.text


def test_weights_split_and_move_live_under_load(cp: ControlPlane, svc: dict[str, Any]) -> None:
    url = svc["access_address"]
    _put_weights(cp, svc, (70, 30))
    time.sleep(2)  # the reconfigure lands within a second; give it two

    def version(_: int) -> str:
        r = httpx.post(url, json=_oip(np.ones((1, 4), np.float32)), timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["model_version"])

    with ThreadPoolExecutor(16) as pool:
        seen = Counter(pool.map(version, range(2000)))
    assert abs(seen["1.0.0"] / 2000 - 0.70) <= 0.04, seen

    # now 0/100 while 8 clients keep sending: nothing lost, all new traffic on 2.0.0 within a second
    stop = threading.Event()
    log: list[tuple[float, int, str | None]] = []

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set() and len(log) < 20_000:
                sent = time.monotonic()
                r = c.post(url, json=_oip(np.ones((1, 4), np.float32)))
                log.append((sent, r.status_code, r.json().get("model_version") if r.status_code == 200 else None))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1)
    _put_weights(cp, svc, (0, 100))
    changed = time.monotonic()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert {code for _, code, _ in log} == {200}, Counter(code for _, code, _ in log)
    late = [v for sent, _, v in log if sent > changed + 1.0]
    assert late and set(late) == {"2.0.0"}, Counter(late)
    _put_weights(cp, svc, (50, 50))


def test_oip_at_the_data_plane_root_finds_the_service_by_name(serve_instance: str, svc: dict[str, Any]) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=serve_instance.removeprefix("http://"))

    def routed() -> bool:
        try:
            return bool(client.is_model_ready("dp"))
        except InferenceServerException:
            return False

    wait_for("the /v2 gateway routes dp", routed, timeout_s=30)
    assert client.is_server_live() and client.get_server_metadata()["name"] == "enginehouse"
    assert client.get_model_metadata("dp", "2.0.0")["versions"] == ["2.0.0"]
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("dp", [inp], model_version="1.0.0", outputs=[triton.InferRequestedOutput("y")])
    np.testing.assert_allclose(res.as_numpy("y"), mlp_reference(x), atol=1e-4)
    with pytest.raises(InferenceServerException, match="no running service named nope"):
        client.infer("nope", [inp])
    client.close()


def _identity_model(folder: Path) -> Path:
    """An ONNX model passing a BYTES (string) tensor and an FP16 tensor through: every byte must survive."""
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_out"]), helper.make_node("Identity", ["h"], ["h_out"])],
        "dtypes",
        [
            helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, ["batch", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def test_bytes_and_fp16_through_tritonclient_binary_and_json(cp: ControlPlane) -> None:
    import tritonclient.http as triton

    src = _identity_model(cp.manager.roots[-1] / "dtypes")
    mid = register(cp.client, "dtypes", src, "ONNX")
    model_status(cp.client, mid, "published")
    s = reach(cp.client, create(cp.client, "dtypes", [{"model_id": mid, "weight": 100, **CPU}]), "running")
    client = triton.InferenceServerClient(url=s["access_address"].removeprefix("http://"))
    words = np.array([b"hello", "wörld".encode(), b"", b"a,b\x00c"], dtype=object)
    halves = np.array([[0.5, -2.0], [65504, 1e-3], [0, 1], [3.25, -0.125]], np.float16)
    for binary in (True, False):
        s_in = triton.InferInput("s", [4], "BYTES")
        s_in.set_data_from_numpy(words, binary_data=binary)
        h_in = triton.InferInput("h", [4, 2], "FP16")
        h_in.set_data_from_numpy(halves, binary_data=True)  # FP16 has no JSON form in tritonclient
        outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("s_out", "h_out")]
        res = client.infer("dtypes", [s_in, h_in], outputs=outs)
        got = [w if isinstance(w, bytes) else str(w).encode() for w in res.as_numpy("s_out").ravel()]
        assert got == list(words)
        np.testing.assert_array_equal(res.as_numpy("h_out"), halves)
    bad = triton.InferInput("s", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
    h_in = triton.InferInput("h", [1, 2], "FP16")
    h_in.set_data_from_numpy(halves[:1])
    with pytest.raises(triton.InferenceServerException, match="UTF-8"):
        client.infer("dtypes", [bad, h_in])
    client.close()
    cp.client.delete(f"/v1/{P}/services/{s['service_id']}")
