"""Open Inference Protocol v2 binary tensor data extension, transport-free.

A binary body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw bytes of every
tensor whose ``parameters.binary_data_size`` is set, in the order the tensors are listed. Fixed-size datatypes are
little-endian raw values (BOOL one byte each); BYTES elements are a 4-byte little-endian length then the bytes.
This is what ``tritonclient`` sends and parses by default.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from runtimes.base import Signature
from runtimes.datatypes import OIP_TO_NUMPY, oip_datatype
from runtimes.errors import InvalidInputError
from serving.dataplane.codec import _is_shape, _json_data, _reshaped, _tensor_from_json

_LEN = struct.Struct("<I")


def _split_bytes(model: str, name: str, buf: memoryview, count: int) -> np.ndarray:
    """``count`` BYTES elements, each a 4-byte little-endian length and that many bytes, filling ``buf`` exactly."""
    items: list[bytes] = []
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < 4:
            raise InvalidInputError(model, f"BYTES element {len(items)} is truncated: its 4-byte length is cut", name)
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if n > end - pos:
            raise InvalidInputError(
                model, f"BYTES element {len(items)} is truncated: length {n}, {end - pos} bytes left", name
            )
        items.append(bytes(buf[pos : pos + n]))
        pos += n
        if len(items) > count:
            break
    if len(items) != count:
        raise InvalidInputError(model, f"binary data holds {len(items)}+ BYTES elements, shape needs {count}", name)
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _binary_tensor(model: str, item: dict, size: Any, raw: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(model, "an input has no 'name'")
    datatype, shape = item.get("datatype"), item.get("shape")
    if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
        raise InvalidInputError(
            model, f"datatype {datatype!r} is not an OIP datatype ({', '.join(OIP_TO_NUMPY)})", name
        )
    if not _is_shape(shape):
        raise InvalidInputError(model, f"'shape' must be a list of non-negative integers, got {shape!r}", name)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInputError(model, f"binary_data_size must be a non-negative integer, got {size!r}", name)
    if size > len(raw) - offset:
        raise InvalidInputError(
            model,
            f"binary_data_size {size} runs past the body: {len(raw) - offset} binary bytes left at offset {offset}",
            name,
        )
    buf = raw[offset : offset + size]
    count = math.prod(shape)
    if datatype == "BYTES":
        return name, _reshaped(model, name, _split_bytes(model, name, buf, count), shape), offset + size
    dtype = OIP_TO_NUMPY[datatype].newbyteorder("<")
    if size != count * dtype.itemsize:
        raise InvalidInputError(
            model, f"binary_data_size {size} does not match shape {shape} x {dtype.itemsize} bytes of {datatype}", name
        )
    arr = np.frombuffer(buf, dtype=dtype)
    if datatype == "BOOL" and arr.size and int(arr.view(np.uint8).max()) > 1:
        raise InvalidInputError(model, "BOOL binary data must be bytes 0 or 1", name)
    return name, _reshaped(model, name, arr, shape), offset + size


def decode_binary(
    model: str, body: bytes, header_length: int, signature: Signature | None
) -> tuple[dict[str, np.ndarray], dict]:
    """Named tensors and request metadata (``id``, ``outputs``, ``parameters``) from a binary-extension body.

    Fixed-size binary tensors are read-only views on ``body`` (no copy).
    """
    if isinstance(header_length, bool) or not isinstance(header_length, int):
        raise InvalidInputError(model, f"Inference-Header-Content-Length must be an integer, got {header_length!r}")
    if header_length < 0 or header_length > len(body):
        raise InvalidInputError(
            model, f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
        )
    view = memoryview(body)
    try:
        header = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(model, f"the inference header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInputError(model, "the inference header must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError(model, "the inference header needs a non-empty 'inputs' list")
    raw = view[header_length:]
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    for item in inputs:
        if not isinstance(item, dict):
            raise InvalidInputError(model, "each entry of 'inputs' must be an object with name, shape, datatype")
        params = item.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidInputError(model, "'parameters' must be an object", str(item.get("name")))
        size = params.get("binary_data_size") if params else None
        if size is None:
            name, arr = _tensor_from_json(model, item)
        else:
            name, arr, offset = _binary_tensor(model, item, size, raw, offset)
        if name in tensors:
            raise InvalidInputError(model, "given twice", name)
        tensors[name] = arr
    if offset != len(raw):
        raise InvalidInputError(
            model,
            f"{len(raw) - offset} trailing bytes after the binary tensor data (binary_data_size totals {offset})",
        )
    meta = {"id": header.get("id"), "outputs": header.get("outputs"), "parameters": header.get("parameters")}
    return tensors, meta


def wants_binary_output(meta: dict) -> set[str] | bool:
    """Which outputs the request asked for as binary: ``True`` for all, a set of names, or ``False`` for none.

    Request-level ``parameters.binary_data_output`` is the default; an entry of ``outputs`` overrides it with its
    own ``parameters.binary_data``.
    """
    params = meta.get("parameters")
    default = bool(isinstance(params, dict) and params.get("binary_data_output") is True)
    wanted = meta.get("outputs")
    if not isinstance(wanted, list) or not wanted:
        return default
    names: set[str] = set()
    for o in wanted:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            continue
        p = o.get("parameters")
        flag = p.get("binary_data") if isinstance(p, dict) else None
        if default if flag is None else flag is True:
            names.add(o["name"])
    return names


def _raw_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in "OSU":
        parts: list[bytes] = []
        for v in arr.ravel():
            b = v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else str(v).encode())
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    dtype = OIP_TO_NUMPY[oip_datatype(arr.dtype)].newbyteorder("<")
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def encode_binary(
    model: str,
    version: str | None,
    outputs: dict[str, np.ndarray],
    meta: dict,
    binary_outputs: bool | set[str],
) -> tuple[bytes, int]:
    """``(body, json_header_length)``: a JSON header, then the raw bytes of the outputs asked for as binary.

    Send ``json_header_length`` as ``Inference-Header-Content-Length``. Outputs not in ``binary_outputs`` (or all
    when it is ``False``) carry JSON ``data``; only the outputs named in ``meta["outputs"]`` are returned, if any are.
    """
    wanted = meta.get("outputs")
    names = (
        {o["name"] for o in wanted if isinstance(o, dict) and isinstance(o.get("name"), str)}
        if isinstance(wanted, list) and wanted
        else None
    )
    resp: dict[str, Any] = {"model_name": model}
    if version:
        resp["model_version"] = version
    if meta.get("id") is not None:
        resp["id"] = meta["id"]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, arr in outputs.items():
        if names is not None and name not in names:
            continue
        arr = np.asarray(arr)
        entry: dict[str, Any] = {"name": name, "datatype": oip_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary_outputs is True or (isinstance(binary_outputs, set) and name in binary_outputs):
            raw = _raw_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(arr)
        entries.append(entry)
    resp["outputs"] = entries
    header = orjson.dumps(resp)
    return header + b"".join(chunks), len(header)
