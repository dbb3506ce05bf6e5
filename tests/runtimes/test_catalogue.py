"""The runtime catalogue: reference shape, accelerators seen through fake NVML / plugin, missing engines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from runtimes.catalogue import build_catalogue, find_runtime, paginate
from runtimes.registry import ENGINES
from tests.runtimes.fakes import fake_pynvml, install_fake_npu_plugin

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path("/work/shared/reference/modelarts-ai-engine-runtimes.txt")
ARRAYS = ("runtimes", "request_mode", "accelerators", "arch", "status_list", "image_source")
ACCEL_KEYS = {"type", "name", "cuda_version", "driver_version_section"}


def _reference() -> dict[str, Any]:
    # The example response is the one line of the reference that starts with '{ "count"'.
    line = next(x for x in REFERENCE.read_text().splitlines() if x.startswith('{ "count"'))
    return json.loads(line)


def _check_shape(cat: dict[str, Any]) -> None:
    assert set(cat) == {"count", "total_count", "engine_runtimes"}
    assert isinstance(cat["count"], int) and isinstance(cat["total_count"], int)
    for item in cat["engine_runtimes"]:
        assert set(item) == {"ai_engine", *ARRAYS}
        assert isinstance(item["ai_engine"], str)
        lengths = {len(item[k]) for k in ARRAYS}
        assert len(lengths) == 1, f"arrays of {item['ai_engine']} differ in length"
        for key in ARRAYS:
            assert isinstance(item[key], list)
        assert all(isinstance(x, str) for k in ARRAYS if k != "accelerators" for x in item[k])
        for accel in item["accelerators"]:
            assert set(accel) <= ACCEL_KEYS and accel["type"] in {"none", "gpu", "npu"}
            assert all(isinstance(v, str) for v in accel.values())
        assert set(item["request_mode"]) <= {"sync", "async"}
        assert set(item["status_list"]) <= {"normal", "unavailable"}


def test_matches_reference_shape_field_for_field() -> None:
    ref = _reference()
    cat = build_catalogue(gpus=[], npus=[])
    _check_shape(ref)  # our checker agrees with the reference itself
    _check_shape(cat)
    assert set(cat) == set(ref)
    ref_item_keys = {frozenset(i) for i in ref["engine_runtimes"]}
    assert {frozenset(i) for i in cat["engine_runtimes"]} == ref_item_keys
    assert [i["ai_engine"] for i in cat["engine_runtimes"]] == list(ENGINES)
    assert cat["count"] == cat["total_count"] == len(ENGINES)


def test_cpu_runtimes_named_from_installed_versions() -> None:
    cat = build_catalogue(gpus=[], npus=[])
    by_engine = {i["ai_engine"]: i for i in cat["engine_runtimes"]}
    torch = by_engine["PyTorch"]
    assert re.fullmatch(r"pytorch_\d+\.\d+\.\d+-cpu-py_\d+\.\d+-(x86_64|aarch64)", torch["runtimes"][0])
    assert "+" not in torch["runtimes"][0]  # "2.13.0+cpu" loses its local tag
    assert torch["request_mode"] == ["sync", "async"]  # one entry per (runtime, mode)
    assert torch["runtimes"][0] == torch["runtimes"][1]
    assert torch["accelerators"] == [{"type": "none"}, {"type": "none"}]
    assert torch["image_source"] == ["base_image", "base_image"]
    assert by_engine["ONNX"]["runtimes"][0].startswith("onnxruntime_")
    assert by_engine["Custom"]["image_source"] == ["custom", "custom"]
    assert all(s == "normal" for i in cat["engine_runtimes"] for s in i["status_list"])
    # No GPU and no NPU seen here: no cuda / cann runtime offered.
    assert not any("cuda" in r or "cann" in r for i in cat["engine_runtimes"] for r in i["runtimes"])


def test_gpu_runtimes_when_nvml_sees_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    cat = build_catalogue(npus=[])
    _check_shape(cat)
    torch = next(i for i in cat["engine_runtimes"] if i["ai_engine"] == "PyTorch")
    pairs = zip(torch["runtimes"], torch["accelerators"], strict=True)
    gpu = [(r, a) for r, a in pairs if a["type"] == "gpu"]
    assert len(gpu) == 2  # sync + async of the single A30 model
    runtime, accel = gpu[0]
    assert re.fullmatch(r"pytorch_\d+\.\d+\.\d+-cuda_12\.4-py_\d+\.\d+-x86_64", runtime)
    assert accel == {"type": "gpu", "name": "a30", "cuda_version": "cuda 12.4"}
    assert find_runtime("PyTorch", runtime, cat)


def test_no_gpu_runtimes_when_nvml_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=12))
    cat = build_catalogue(npus=[])
    assert not any(a["type"] == "gpu" for i in cat["engine_runtimes"] for a in i["accelerators"])


def test_npu_runtimes_from_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npu_plugin(tmp_path, monkeypatch)
    cat = build_catalogue(gpus=[])
    _check_shape(cat)
    ms = next(i for i in cat["engine_runtimes"] if i["ai_engine"] == "MindSpore")
    npu = [(r, a) for r, a in zip(ms["runtimes"], ms["accelerators"], strict=True) if a["type"] == "npu"]
    assert len(npu) == 2
    runtime, accel = npu[0]
    assert re.fullmatch(r"mindspore_\d+\.\d+\.\d+-cann-py_\d+\.\d+-x86_64-snt9", runtime)
    assert accel == {"type": "npu", "name": "SNT9", "driver_version_section": "C8x"}
    onnx = next(i for i in cat["engine_runtimes"] if i["ai_engine"] == "ONNX")
    assert all(a["type"] != "npu" for a in onnx["accelerators"])  # ONNX Runtime has no CANN build here


def test_paginate() -> None:
    cat = build_catalogue(gpus=[], npus=[])
    page = paginate(cat, limit=2, offset=1)
    assert page["count"] == 2 and page["total_count"] == 5
    assert [i["ai_engine"] for i in page["engine_runtimes"]] == ["TensorFlow", "ONNX"]
    assert paginate(cat, "10", "4")["count"] == 1  # the API passes strings
    assert paginate(cat, None, None)["count"] == 5
    assert paginate(cat, 3, 99) == {"count": 0, "total_count": 5, "engine_runtimes": []}
    with pytest.raises(ValueError, match="limit"):
        paginate(cat, "x", 0)
    with pytest.raises(ValueError, match="offset"):
        paginate(cat, 1, -1)


def test_find_runtime() -> None:
    cat = build_catalogue(gpus=[], npus=[])
    name = cat["engine_runtimes"][0]["runtimes"][0]
    assert find_runtime("PyTorch", name, cat)
    assert not find_runtime("ONNX", name, cat)
    assert not find_runtime("PyTorch", "pytorch_0.1-cpu", cat)
    assert find_runtime("PyTorch", name)  # builds (and detects) itself


# Runs in a fresh interpreter: every meta-path finder is wrapped so that none of them finds mindspore, as if
# it were not installed (importlib.util.find_spec answers None; its metadata may still be there).
_HIDE_MINDSPORE = textwrap.dedent("""
    import importlib.util, json, sys

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "mindspore" or name.startswith("mindspore."):
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    assert importlib.util.find_spec("mindspore") is None
    from runtimes.catalogue import build_catalogue
    print(json.dumps(build_catalogue(gpus=[], npus=[])))
""")


def test_absent_engine_is_listed_unavailable() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HIDE_MINDSPORE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    cat = json.loads(out.stdout)
    _check_shape(cat)
    status = {i["ai_engine"]: set(i["status_list"]) for i in cat["engine_runtimes"]}
    assert status.pop("MindSpore") == {"unavailable"}
    assert all(s == {"normal"} for s in status.values())


def test_cli_runtimes_json() -> None:
    cli = Path(sys.executable).parent / "enginehouse"
    if not cli.exists():
        pytest.skip("enginehouse console script not installed in this environment")
    out = subprocess.run(
        [str(cli), "runtimes", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    cat = json.loads(out.stdout)
    _check_shape(cat)
    assert [i["ai_engine"] for i in cat["engine_runtimes"]] == list(ENGINES)


def test_cli_runtimes_table() -> None:
    cli = Path(sys.executable).parent / "enginehouse"
    if not cli.exists():
        pytest.skip("enginehouse console script not installed in this environment")
    out = subprocess.run(
        [str(cli), "runtimes"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "pytorch_" in out.stdout and "MindSpore" in out.stdout
