"""PyTorch adapter on real torch: TorchScript and torch.export parity, signature, input/load errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.mlp_weights import IN, mlp_reference
from runtimes.base import TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.registry import load_model

torch = pytest.importorskip("torch", reason="the PyTorch engine needs torch")
# the adapter fixture is loaded once per module, so its tests share the session loop it was loaded on
pytestmark = pytest.mark.asyncio(loop_scope="session")

SIGNATURE = (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)


@pytest.fixture(scope="module")
def ts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding the example TorchScript model, built once per module."""
    from models.build import build_torchscript

    version_dir = tmp_path_factory.mktemp("torchscript") / "1.0.0"
    build_torchscript(version_dir)
    return version_dir


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding the example torch.export archive, built once per module."""
    from models.build import build_torch_export

    version_dir = tmp_path_factory.mktemp("export") / "1.0.0"
    build_torch_export(version_dir)
    return version_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def adapter(ts_dir: Path):
    """The loaded TorchScript adapter."""
    loaded = await load_model(ts_dir, name="mlp-torch")
    yield loaded
    await loaded.unload()


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, IN)).astype(np.float32)


async def test_signature_from_signature_file(adapter) -> None:
    assert (adapter.signature.inputs, adapter.signature.outputs) == SIGNATURE


@pytest.mark.parametrize("n", [1, 7])
async def test_torchscript_matches_reference_and_torch(adapter, ts_dir: Path, n: int) -> None:
    x = _rows(n)
    out = await adapter.infer({"x": x})
    assert set(out) == {"y"} and out["y"].shape == (n, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)
    direct = torch.jit.load(str(ts_dir / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(out["y"], direct(torch.from_numpy(x)).numpy(), atol=1e-6)


@pytest.mark.parametrize("n", [1, 7])
async def test_torch_export_matches_reference(export_dir: Path, n: int) -> None:
    loaded = await load_model(export_dir, name="mlp-export")
    try:
        assert (loaded.signature.inputs, loaded.signature.outputs) == SIGNATURE
        x = _rows(n)
        out = await loaded.infer({"x": x})
        np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)
        direct = torch.export.load(str(export_dir / "model.pt2")).module()
        np.testing.assert_allclose(out["y"], direct(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    finally:
        await loaded.unload()


async def test_torch_export_signature_derived_without_file(export_dir: Path, tmp_path: Path) -> None:
    # without signature.json the input specs come from the exported graph; outputs get positional names
    for name in ("model.pt2", "config.json"):
        (tmp_path / name).write_bytes((export_dir / name).read_bytes())
    loaded = await load_model(tmp_path)
    try:
        assert loaded.signature.inputs == SIGNATURE[0]
        assert loaded.signature.outputs == (TensorSpec("output_0", "FP32", (-1, 3)),)
    finally:
        await loaded.unload()


@pytest.mark.parametrize("model_file", ["model.pt", "model.pt2"])
async def test_corrupt_file_is_load_error(tmp_path: Path, model_file: str) -> None:
    config = {"engine": "PyTorch", "model_file": model_file}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / model_file).write_bytes(b"\x00garbage, not a torch archive\xff" * 10)
    with pytest.raises(ModelLoadError) as err:
        await load_model(tmp_path, name="broken")
    assert err.value.model == "broken"


async def test_missing_file_is_load_error(ts_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((ts_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="does not exist"):
        await load_model(tmp_path, name="missing")


async def test_torchscript_without_signature_file_is_load_error(ts_dir: Path, tmp_path: Path) -> None:
    for name in ("model.pt", "config.json"):
        (tmp_path / name).write_bytes((ts_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="signature"):
        await load_model(tmp_path, name="nosig")
