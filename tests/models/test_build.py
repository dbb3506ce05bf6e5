"""The example model builder: deterministic files, ensure_examples layout, and parity across engines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from models.build import build_onnx, build_torchscript, ensure_examples, runtime_name
from models.mlp_weights import IN, mlp_reference
from runtimes.registry import load_model

pytest.importorskip("onnx", reason="the ONNX example needs onnx")
pytest.importorskip("torch", reason="the TorchScript example needs torch")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with every example whose framework is installed."""
    root = tmp_path_factory.mktemp("repo")
    ensure_examples(root)
    return root


def test_onnx_build_is_byte_identical(tmp_path: Path) -> None:
    a, b = build_onnx(tmp_path / "a"), build_onnx(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/config.json").read_bytes() == (tmp_path / "b/config.json").read_bytes()


def test_torchscript_build_writes_signature_and_config(tmp_path: Path) -> None:
    build_torchscript(tmp_path)
    assert json.loads((tmp_path / "signature.json").read_text())["inputs"][0]["shape"] == [-1, IN]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"engine": "PyTorch", "runtime": runtime_name("torch", "pytorch"), "model_file": "model.pt"}
    assert "+" not in config["runtime"]  # torch's local label "+cpu" is not part of the runtime name


def test_ensure_examples_layout_and_idempotence(root: Path) -> None:
    for name, model_file in (("mlp-onnx", "model.onnx"), ("mlp-torchscript", "model.pt")):
        assert (root / name / "1.0.0" / model_file).is_file()
        assert (root / name / "1.0.0" / "config.json").is_file()
    assert (root / "mlp-torchscript/1.0.0/signature.json").is_file()
    config = json.loads((root / "mlp-onnx/1.0.0/config.json").read_text())
    assert config["engine"] == "ONNX" and config["runtime"].startswith("onnxruntime_")
    assert ensure_examples(root) == []  # everything present: nothing rebuilt


def _engines(root: Path) -> list[str]:
    names = ["mlp-onnx", "mlp-torchscript"]
    # the SavedModel/MindIR examples exist only where their exporter module and framework are installed
    if importlib.util.find_spec("models._export_tf") and importlib.util.find_spec("tensorflow"):
        names.append("mlp-savedmodel")
    if importlib.util.find_spec("models._export_mindspore") and importlib.util.find_spec("mindspore"):
        names.append("mlp-mindir")
    return names


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("n", [1, 7])
async def test_all_engines_agree(root: Path, n: int) -> None:
    x = np.random.default_rng(100 + n).standard_normal((n, IN)).astype(np.float32)
    expected = mlp_reference(x)
    outputs = {}
    for name in _engines(root):
        adapter = await load_model(root / name / "1.0.0", name=name)
        try:
            outputs[name] = (await adapter.infer({"x": x}))["y"]
        finally:
            await adapter.unload()
    assert len(outputs) == len(_engines(root))
    for name, y in outputs.items():
        np.testing.assert_allclose(y, expected, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(y, outputs["mlp-onnx"], atol=1e-4, err_msg=f"{name} vs ONNX")
