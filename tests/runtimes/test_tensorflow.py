"""TensorFlow adapter against the real SavedModel runtime: parity, signature, input and load errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.mlp_weights import mlp_reference
from runtimes.base import TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.registry import load_model

pytest.importorskip("tensorflow")
# the adapter fixture is loaded once per module, so its tests share the session loop it was loaded on
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding the example SavedModel, built once per module."""
    from models._export_tf import build_savedmodel

    version_dir = tmp_path_factory.mktemp("tf") / "1"
    build_savedmodel(version_dir)
    return version_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def adapter(tf_dir: Path):
    """The loaded TensorFlow adapter."""
    loaded = await load_model(tf_dir, name="mlp-tf")
    yield loaded
    await loaded.unload()


async def test_config_names_engine_and_runtime(tf_dir: Path) -> None:
    import json

    config = json.loads((tf_dir / "config.json").read_text())
    assert config["engine"] == "TensorFlow"
    assert config["model_file"] == "saved_model"
    assert config["runtime"].startswith("tensorflow_2.") and "-cpu-py_3." in config["runtime"]


async def test_signature(adapter) -> None:
    assert adapter.engine == "TensorFlow"
    assert adapter.signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert adapter.signature.outputs == (TensorSpec("y", "FP32", (-1, 3)),)


@pytest.mark.parametrize("rows", [1, 7])
async def test_matches_reference_and_framework(adapter, tf_dir: Path, rows: int) -> None:
    import tensorflow as tf

    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    out = await adapter.infer({"x": x})
    assert set(out) == {"y"}
    assert out["y"].shape == (rows, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)
    # the SavedModel's own signature function, called directly
    direct = tf.saved_model.load(str(tf_dir / "saved_model")).signatures["serving_default"](x=tf.constant(x))
    np.testing.assert_allclose(out["y"], direct["y"].numpy(), atol=1e-6)


async def test_missing_model(tmp_path: Path, tf_dir: Path) -> None:
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    shutil.copy(tf_dir / "config.json", version_dir / "config.json")
    with pytest.raises(ModelLoadError):
        await load_model(version_dir)


async def test_corrupt_model(tmp_path: Path, tf_dir: Path) -> None:
    version_dir = tmp_path / "1"
    shutil.copytree(tf_dir, version_dir)
    (version_dir / "saved_model" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModelLoadError):
        await load_model(version_dir)
