"""The adapter contract every tensor engine keeps, checked once over all four example exports.

Engine modules' own tests cover what differs per framework (parity with the framework called directly,
load errors of its file format); what the shared base guarantees is checked here for every engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.mlp_weights import IN, mlp_reference
from runtimes.base import TensorSpec
from runtimes.errors import InvalidInputError
from runtimes.registry import load_model

pytestmark = pytest.mark.asyncio(loop_scope="session")
EXAMPLES = ["mlp-onnx", "mlp-torchscript", "mlp-savedmodel", "mlp-mindir"]


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=EXAMPLES)
async def adapter(request: pytest.FixtureRequest, example_models: Path):
    """Each example export, loaded once through the registry as a replica would."""
    loaded = await load_model(example_models / request.param / "1.0.0", name=request.param)
    yield loaded
    await loaded.unload()


async def test_signature_is_oip_with_dynamic_batch(adapter) -> None:
    assert adapter.signature.inputs == (TensorSpec("x", "FP32", (-1, IN)),)
    assert adapter.signature.outputs == (TensorSpec("y", "FP32", (-1, 3)),)


@pytest.mark.parametrize("rows", [1, 7])
async def test_matches_the_numpy_reference(adapter, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, IN)).astype(np.float32)
    out = await adapter.infer({"x": x})
    assert set(out) == {"y"} and out["y"].shape == (rows, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], mlp_reference(x), atol=1e-4)


@pytest.mark.parametrize(
    ("inputs", "tensor", "needle"),
    [
        ({"z": np.zeros((2, IN), np.float32)}, "z", "unknown input"),
        ({}, "x", "missing input"),
        ({"x": np.zeros((2, 5), np.float32)}, "x", "shape [2, 5] given"),
        ({"x": np.zeros((IN,), np.float32)}, "x", "shape [4] given"),
        ({"x": np.zeros((2, IN), np.float64)}, "x", "datatype FP64 given, FP32 expected"),
    ],
    ids=["wrong-name", "missing", "wrong-shape", "wrong-rank", "wrong-dtype"],
)
async def test_bad_input_names_model_tensor_and_expectation(adapter, inputs, tensor: str, needle: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        await adapter.infer(inputs)
    assert err.value.model == adapter.name and err.value.tensor == tensor
    assert adapter.name in str(err.value) and f"'{tensor}'" in str(err.value) and needle in str(err.value)
