"""The service replica on a real Ray Serve: weighted versions, pinning, live weights, bad input."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_version_service(serve_instance: str, example_models: Path):
    """One service, ONNX as 1.0.0 and TorchScript as 2.0.0, weights 70/30."""
    from serving.dataplane import deploy

    versions = [
        {"version": "1.0.0", "model_dir": str(example_models / "mlp-onnx" / "1.0.0"), "weight": 70},
        {"version": "2.0.0", "model_dir": str(example_models / "mlp-torchscript" / "1.0.0"), "weight": 30},
    ]
    deploy.put(deploy.service_app("svc-two", versions, num_cpus=0.25))
    deploy.wait_running("svc-two")
    yield f"{serve_instance}/v1/infers/svc-two", versions
    deploy.remove("svc-two")


def test_weighted_split_and_results(two_version_service) -> None:
    url, _ = two_version_service
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    body = {"id": "r1", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    seen: collections.Counter[str] = collections.Counter()
    with httpx.Client(timeout=30) as client:
        for _ in range(400):
            r = client.post(url, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["id"] == "r1"
            y = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
            np.testing.assert_allclose(y, mlp_reference(x), atol=1e-4)
            seen[out["model_version"]] += 1
    share = seen["1.0.0"] / 400
    assert 0.6 <= share <= 0.8, seen  # 70 % +- 10 points: binomial sd is 2.3 points at n=400


def test_instances_and_pinned_version(two_version_service) -> None:
    url, _ = two_version_service
    with httpx.Client(timeout=30) as client:
        r = client.post(url, json={"instances": [[1, 2, 3, 4], [0, 0, 0, 0]]}, headers={"X-Model-Version": "2.0.0"})
        assert r.status_code == 200, r.text
        preds = np.asarray(r.json()["predictions"], dtype=np.float32)
        np.testing.assert_allclose(preds, mlp_reference(np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32)), atol=1e-4)
        r = client.post(url, json={"instances": [[1, 2, 3, 4]]}, headers={"X-Model-Version": "9.9.9"})
        assert r.status_code == 404 and "9.9.9" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": [{"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "nope"),
        ({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}, "shape"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}, "FP64"),
        ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "elements"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": [1, 2, 3, 4]}]}, "FP99"),
        ({"instances": "no"}, "instances"),
        ([1, 2], "object"),
    ],
)
def test_bad_input_is_4xx_naming_the_problem(two_version_service, body, needle) -> None:
    url, _ = two_version_service
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_malformed_json_is_400(two_version_service) -> None:
    url, _ = two_version_service
    r = httpx.post(url, content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def _replica_actors(app: str) -> set[str]:
    """Names of the live replica actors of an application (new names would mean a redeploy)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{app}#replica#" in a["name"]}


def test_weights_change_live(two_version_service) -> None:
    from serving.dataplane import deploy

    url, versions = two_version_service
    replicas_before = _replica_actors("svc-two")
    assert replicas_before
    moved = [dict(v, weight=w) for v, w in zip(versions, (0, 100), strict=True)]
    deploy.put(deploy.service_app("svc-two", moved, num_cpus=0.25))
    deadline = time.monotonic() + 10
    body = {"instances": [[1, 2, 3, 4]]}
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:  # a user_config change reconfigures the running replicas
            if all(
                client.post(
                    url, json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
                ).json()["model_version"]
                == "2.0.0"
                for _ in range(30)
            ):
                break
        else:
            pytest.fail("weights 0/100 did not take effect within 10 s")
        assert client.post(url, json=body).status_code == 200
    # a live reconfigure, not a redeploy: the same replicas keep running
    assert _replica_actors("svc-two") == replicas_before
