"""OIP v2 JSON and instances codecs, with no transport."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.base import Signature, TensorSpec
from runtimes.datatypes import OIP_TO_NUMPY
from runtimes.errors import InvalidInputError
from serving.dataplane.codec import decode_request, encode_response

SIG = Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))


@pytest.mark.parametrize("datatype", [d for d in OIP_TO_NUMPY if d != "BYTES"])
def test_every_numeric_datatype_round_trips(datatype: str) -> None:
    data = [0, 1, 1, 0] if datatype == "BOOL" else [1, 2, 3, 4]
    tensors, meta = decode_request(
        "m", {"id": "7", "inputs": [{"name": "t", "shape": [2, 2], "datatype": datatype, "data": data}]}, None
    )
    assert tensors["t"].dtype == OIP_TO_NUMPY[datatype] and tensors["t"].shape == (2, 2)
    out = encode_response("m", "1.0.0", tensors, meta)
    assert out["id"] == "7" and out["model_version"] == "1.0.0"
    assert out["outputs"] == [
        {"name": "t", "datatype": datatype, "shape": [2, 2], "data": np.asarray(data, OIP_TO_NUMPY[datatype]).tolist()}
    ]


def test_bytes_round_trip() -> None:
    tensors, meta = decode_request(
        "m", {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["héllo", "world"]}]}, None
    )
    assert tensors["s"].tolist() == ["héllo".encode(), b"world"]
    assert encode_response("m", None, tensors, meta)["outputs"][0]["data"] == ["héllo", "world"]


def test_nested_data_is_accepted_and_requested_outputs_filter() -> None:
    tensors, meta = decode_request(
        "m",
        {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}],
            "outputs": [{"name": "y"}],
        },
        SIG,
    )
    out = encode_response("m", None, {"y": np.zeros((1, 3), np.float32), "z": np.ones(1)}, meta)
    assert [o["name"] for o in out["outputs"]] == ["y"]
    assert tensors["x"].shape == (1, 4)


def test_instances() -> None:
    tensors, meta = decode_request("m", {"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}, SIG)
    assert tensors["x"].dtype == np.float32 and tensors["x"].shape == (2, 4)
    assert encode_response("m", None, {"y": np.ones((2, 3), np.float32)}, meta) == {"predictions": [[1.0] * 3] * 2}
    tensors, _ = decode_request("m", {"instances": [{"x": [1, 2, 3, 4]}]}, SIG)
    assert tensors["x"].shape == (1, 4)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "'inputs'"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}, "3 elements"),
        ({"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": []}]}, "shape"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}, "FP32"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1000]}]}, "INT8"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "name"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "data"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "twice"),
        ({"instances": []}, "non-empty"),
        ({"instances": [{"q": 1}]}, "missing"),
        ("text", "JSON object"),
    ],
)
def test_bad_requests_name_the_problem(body, needle) -> None:
    with pytest.raises(InvalidInputError) as err:
        decode_request("m", body, SIG)
    assert needle in str(err.value)
