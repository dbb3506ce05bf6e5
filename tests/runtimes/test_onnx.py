"""ONNX adapter against real onnxruntime: parity, signature, input errors, load errors, loop not blocked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.mlp_weights import IN, mlp_reference
from runtimes.base import Placement, TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.registry import load_model

ort = pytest.importorskip("onnxruntime", reason="the ONNX engine needs onnxruntime")
pytest.importorskip("onnx", reason="building the example graph needs onnx")
# the adapter fixture is loaded once per module, so its tests share the session loop it was loaded on
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding the example ONNX model, built once per module."""
    from models.build import build_onnx

    version_dir = tmp_path_factory.mktemp("onnx") / "1.0.0"
    build_onnx(version_dir)
    return version_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def adapter(onnx_dir: Path):
    """The loaded ONNX adapter."""
    loaded = await load_model(onnx_dir, name="mlp-onnx")
    yield loaded
    await loaded.unload()


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, IN)).astype(np.float32)


async def test_signature_has_dynamic_batch(adapter) -> None:
    assert adapter.signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert adapter.signature.outputs == (TensorSpec("y", "FP32", (-1, 3)),)


@pytest.mark.parametrize("n", [1, 7])
async def test_matches_reference_and_onnxruntime(adapter, onnx_dir: Path, n: int) -> None:
    x = _rows(n)
    out = await adapter.infer({"x": x})
    assert set(out) == {"y"}
    assert out["y"].shape == (n, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)
    direct = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out["y"], direct.run(None, {"x": x})[0], atol=1e-6)


async def test_corrupt_file_is_load_error(onnx_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((onnx_dir / "config.json").read_text())
    (tmp_path / "model.onnx").write_bytes(b"\x00not an onnx graph\xff" * 10)
    with pytest.raises(ModelLoadError) as err:
        await load_model(tmp_path, name="broken")
    assert err.value.model == "broken"


async def test_missing_file_is_load_error(onnx_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((onnx_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="does not exist"):
        await load_model(tmp_path, name="missing")


async def test_gpu_placement_falls_back_to_cpu_provider(onnx_dir: Path) -> None:
    # CUDA/TensorRT are only chosen when onnxruntime has them; the CPU provider always closes the list
    loaded = await load_model(onnx_dir, placement=Placement(device="cuda:0", cpu_threads=2))
    try:
        providers = loaded.providers()
        assert providers[-1] == "CPUExecutionProvider"
        available = set(ort.get_available_providers())
        assert all(p[0] in available for p in providers[:-1])
        x = _rows(3)
        np.testing.assert_allclose((await loaded.infer({"x": x}))["y"], mlp_reference(x), atol=1e-4)
    finally:
        await loaded.unload()


async def test_event_loop_keeps_running_during_inference(adapter) -> None:
    # inference runs on the engine thread, so a ticker on the loop advances while 50 batches run
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    x = _rows(64)
    for _ in range(50):
        await adapter.infer({"x": x})
    stop.set()
    await task
    assert ticks >= 50
