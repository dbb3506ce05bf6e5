"""MindSpore adapter against the real MindIR runtime: parity, dynamic batch, signature, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.mlp_weights import mlp_reference
from runtimes.base import TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.registry import load_model

pytest.importorskip("mindspore")
# the adapter fixture is loaded once per module, so its tests share the session loop it was loaded on
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def ms_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding the example MindIR, built once per module."""
    from models._export_mindspore import build_mindir

    version_dir = tmp_path_factory.mktemp("ms") / "1"
    build_mindir(version_dir)
    return version_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def adapter(ms_dir: Path):
    """The loaded MindSpore adapter."""
    loaded = await load_model(ms_dir, name="mlp-ms")
    yield loaded
    await loaded.unload()


async def test_config_names_engine_and_runtime(ms_dir: Path) -> None:
    config = json.loads((ms_dir / "config.json").read_text())
    assert config["engine"] == "MindSpore"
    assert config["model_file"] == "model.mindir"
    assert config["runtime"].startswith("mindspore_2.") and "-cpu-py_3." in config["runtime"]


async def test_signature(adapter) -> None:
    assert adapter.engine == "MindSpore"
    # the exported batch dimension is truly dynamic, so -1
    assert adapter.signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert adapter.signature.outputs == (TensorSpec("y", "FP32", (-1, 3)),)


@pytest.mark.parametrize("rows", [1, 7, 3])
async def test_matches_reference_and_framework(adapter, rows: int) -> None:
    import mindspore as ms

    from models._export_mindspore import build_mlp_cell

    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    out = await adapter.infer({"x": x})
    assert set(out) == {"y"}
    assert out["y"].shape == (rows, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)
    # the MindSpore cell itself, called directly
    np.testing.assert_allclose(out["y"], build_mlp_cell()(ms.Tensor(x)).asnumpy(), atol=1e-5)


async def test_missing_model(tmp_path: Path, ms_dir: Path) -> None:
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    for name in ("config.json", "signature.json"):
        shutil.copy(ms_dir / name, version_dir / name)
    with pytest.raises(ModelLoadError):
        await load_model(version_dir)


async def test_corrupt_model(tmp_path: Path, ms_dir: Path) -> None:
    version_dir = tmp_path / "1"
    shutil.copytree(ms_dir, version_dir)
    (version_dir / "model.mindir").write_bytes(b"not a mindir file")
    with pytest.raises(ModelLoadError):
        await load_model(version_dir)


async def test_missing_signature(tmp_path: Path, ms_dir: Path) -> None:
    version_dir = tmp_path / "1"
    shutil.copytree(ms_dir, version_dir)
    (version_dir / "signature.json").unlink()
    with pytest.raises(ModelLoadError):
        await load_model(version_dir)
