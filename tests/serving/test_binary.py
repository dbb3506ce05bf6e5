"""OIP v2 binary tensor data extension, checked against tritonclient's own request builder and response parser."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtimes.datatypes import OIP_TO_NUMPY
from runtimes.errors import InvalidInputError
from serving.dataplane.binary import decode_binary, encode_binary, wants_binary_output

httpclient = pytest.importorskip("tritonclient.http")
Client = httpclient.InferenceServerClient

NUMERIC = [d for d in OIP_TO_NUMPY if d != "BYTES"]


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    n = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"é{i}".encode() * i for i in range(n)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    return (
        (np.arange(n) * 3 - 1 if datatype[0] != "U" else np.arange(n) * 3).astype(OIP_TO_NUMPY[datatype]).reshape(shape)
    )


def _request(arrays: dict[str, tuple[str, np.ndarray, bool]], **kw: object) -> tuple[bytes, int]:
    inputs = []
    for name, (datatype, arr, binary) in arrays.items():
        i = httpclient.InferInput(name, list(arr.shape), datatype)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    body, json_size = Client.generate_request_body(inputs, **kw)
    return body, len(body) if json_size is None else json_size


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object and got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", list(OIP_TO_NUMPY))
def test_every_datatype_decodes_from_tritonclient(datatype: str, binary: bool) -> None:
    arr = _sample(datatype)
    body, hlen = _request({"t": (datatype, arr, binary)}, request_id="r1")
    tensors, meta = decode_binary("m", body, hlen, None)
    _assert_same(tensors["t"], arr)
    assert meta["id"] == "r1"


def test_mixed_binary_and_json_inputs() -> None:
    arrays = {
        "a": ("FP16", _sample("FP16"), True),
        "b": ("INT64", _sample("INT64", (4,)), False),
        "c": ("BYTES", _sample("BYTES", (3, 1)), True),
        "d": ("BOOL", _sample("BOOL"), False),
        "e": ("FP32", _sample("FP32", (1, 5)), True),
        "f": ("UINT8", _sample("UINT8", (0, 2)), True),
    }
    body, hlen = _request(arrays)
    tensors, _ = decode_binary("m", body, hlen, None)
    assert list(tensors) == list(arrays)
    for name, (_, arr, _) in arrays.items():
        _assert_same(tensors[name], arr)


def test_fixed_size_binary_is_a_view_not_a_copy() -> None:
    arr = _sample("FP32")
    body, hlen = _request({"t": ("FP32", arr, True)})
    t = decode_binary("m", body, hlen, None)[0]["t"]
    assert not t.flags.writeable and t.base is not None


@pytest.mark.parametrize("datatype", list(OIP_TO_NUMPY))
def test_binary_outputs_parse_with_tritonclient(datatype: str) -> None:
    arr = _sample(datatype)
    other = _sample("FP64", (2,))
    body, hlen = encode_binary("m", "1", {"y": arr, "z": other}, {"id": "42"}, {"y"})
    result = Client.parse_response_body(body, header_length=hlen)
    assert result.get_response()["id"] == "42"
    assert result.get_output("y")["parameters"]["binary_data_size"] > 0
    assert "data" in result.get_output("z")
    got = result.as_numpy("y")
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist()
    else:
        _assert_same(got, arr)
    _assert_same(result.as_numpy("z"), other)


def test_round_trip_with_tritonclient_requested_outputs() -> None:
    x = _sample("INT32", (3, 2))
    inputs = [httpclient.InferInput("x", [3, 2], "INT32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    outs = [
        httpclient.InferRequestedOutput("y", binary_data=True),
        httpclient.InferRequestedOutput("z", binary_data=False),
    ]
    body, hlen = Client.generate_request_body(inputs, outputs=outs, request_id="abc")
    tensors, meta = decode_binary("m", body, hlen, None)
    assert wants_binary_output(meta) == {"y"}
    y, z, w = tensors["x"] * 2, tensors["x"].astype(np.float32), tensors["x"]
    rbody, rlen = encode_binary("m", None, {"y": y, "z": z, "w": w}, meta, wants_binary_output(meta))
    result = Client.parse_response_body(rbody, header_length=rlen)
    _assert_same(result.as_numpy("y"), x * 2)
    _assert_same(result.as_numpy("z"), x.astype(np.float32))
    assert result.as_numpy("w") is None  # not requested
    assert result.get_response()["id"] == "abc"


def test_no_outputs_requested_means_all_binary() -> None:
    body, hlen = _request({"x": ("FP32", _sample("FP32"), True)})
    _, meta = decode_binary("m", body, hlen, None)
    assert wants_binary_output(meta) is True
    assert wants_binary_output({"id": None, "outputs": None, "parameters": None}) is False
    rbody, rlen = encode_binary("m", None, {"a": _sample("UINT16"), "b": _sample("BYTES")}, meta, True)
    result = Client.parse_response_body(rbody, header_length=rlen)
    _assert_same(result.as_numpy("a"), _sample("UINT16"))
    assert result.as_numpy("b").tolist() == _sample("BYTES").tolist()
    assert all("data" not in result.get_output(n) for n in "ab")


def test_all_json_response_parses_too() -> None:
    rbody, rlen = encode_binary("m", None, {"a": _sample("INT8")}, {}, False)
    assert rlen == len(rbody)
    _assert_same(Client.parse_response_body(rbody, header_length=rlen).as_numpy("a"), _sample("INT8"))


def _hdr(inputs: list, tail: bytes = b"") -> tuple[bytes, int]:
    h = orjson.dumps({"inputs": inputs})
    return h + tail, len(h)


def _fp32(name: str = "x", shape: list | None = None, size: object = 8) -> dict:
    return {"name": name, "datatype": "FP32", "shape": shape or [2], "parameters": {"binary_data_size": size}}


BAD = {
    "negative header length": (b"{}", -1, "outside the body"),
    "header longer than body": (b"{}", 3, "outside the body"),
    "header not json": (b"{nope" + b"\0" * 8, 5, "not JSON"),
    "header not an object": (b"[1]", 3, "JSON object"),
    "no inputs": (b"{}", 2, "'inputs'"),
    "size mismatching shape": (*_hdr([_fp32(size=4)], b"\0" * 4), "'x'"),
    "sizes past the body": (*_hdr([_fp32(), _fp32("y")], b"\0" * 12), "'y'"),
    "sizes short of the body": (*_hdr([_fp32()], b"\0" * 9), "trailing"),
    "negative size": (*_hdr([_fp32(size=-8)], b""), "'x'"),
    "unknown datatype": (*_hdr([{**_fp32(), "datatype": "FP8"}], b"\0" * 8), "'x'"),
    "truncated BYTES length": (
        *_hdr([{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}], b"\0\0"),
        "'s'",
    ),
    "truncated BYTES element": (
        *_hdr(
            [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}],
            struct.pack("<I", 5) + b"ab",
        ),
        "truncated",
    ),
    "too few BYTES elements": (
        *_hdr(
            [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 6}}],
            struct.pack("<I", 2) + b"ab",
        ),
        "'s'",
    ),
    "bool not 0 or 1": (
        *_hdr([{"name": "b", "datatype": "BOOL", "shape": [1], "parameters": {"binary_data_size": 1}}], b"\x07"),
        "'b'",
    ),
    "json input bad datatype": (*_hdr([{"name": "j", "datatype": "X", "shape": [1], "data": [1]}]), "'j'"),
    "duplicate name": (*_hdr([_fp32(), _fp32()], b"\0" * 16), "given twice"),
    "parameters not an object": (*_hdr([{**_fp32(), "parameters": 3}], b""), "parameters"),
}


@pytest.mark.parametrize(("body", "hlen", "needle"), list(BAD.values()), ids=list(BAD))
def test_bad_bodies_raise_invalid_input(body: bytes, hlen: int, needle: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        decode_binary("m", body, hlen, None)
    assert needle in str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=-5, max_value=250))
def test_random_bytes_only_raise_invalid_input(body: bytes, hlen: int) -> None:
    with contextlib.suppress(InvalidInputError):
        decode_binary("m", body, hlen, None)


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.text(max_size=4), st.sampled_from(list(OIP_TO_NUMPY))
)
_item = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["a", "b"]), _scalar),
        "datatype": st.one_of(st.sampled_from(list(OIP_TO_NUMPY)), _scalar),
        "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), _scalar),
        "data": st.one_of(st.lists(_scalar, max_size=4), _scalar),
        "parameters": st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.one_of(_scalar, st.integers(0, 40))}), _scalar
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_item, max_size=3), st.binary(max_size=48))
def test_random_headers_only_raise_invalid_input(inputs: list, tail: bytes) -> None:
    body, hlen = _hdr(inputs, tail)
    with contextlib.suppress(InvalidInputError):
        decode_binary("m", body, hlen, None)
