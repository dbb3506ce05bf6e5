"""Transport-free payload codecs: OIP v2 JSON and ``{"instances": [...]}`` <-> named numpy tensors."""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import numpy as np

from runtimes.base import Signature
from runtimes.datatypes import OIP_TO_NUMPY, oip_datatype
from runtimes.errors import InvalidInputError


def _is_shape(shape: Any) -> TypeGuard[list[int]]:
    """A list of non-negative integers (JSON ``true`` is not a dimension, though Python counts it an int)."""
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)


def _reshaped(model: str, name: str, flat: np.ndarray, shape: list[int]) -> np.ndarray:
    """``flat`` in ``shape``; a shape numpy cannot make (over 64 dimensions, or one too large even for zero
    elements) is the request's error."""
    try:
        return flat.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(model, f"shape {shape} cannot be made: {exc}", name) from None


def _bytes_element(value: Any) -> bytes:
    """One BYTES element from JSON: a string, UTF-8 encoded (bytes from Python callers as they are).

    Anything else is refused: ``bytes(n)`` of a JSON number would allocate n zero bytes.
    """
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"a BYTES element must be a string, got {type(value).__name__}")


def _tensor_from_json(model: str, item: Any) -> tuple[str, np.ndarray]:
    if not isinstance(item, dict):
        raise InvalidInputError(model, "each entry of 'inputs' must be an object with name, shape, datatype, data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(model, "an input has no 'name'")
    datatype, shape, data = item.get("datatype"), item.get("shape"), item.get("data")
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInputError(
            model, f"datatype {datatype!r} is not an OIP datatype ({', '.join(OIP_TO_NUMPY)})", name
        )
    if not _is_shape(shape):
        raise InvalidInputError(model, f"'shape' must be a list of non-negative integers, got {shape!r}", name)
    if data is None:
        raise InvalidInputError(model, "'data' is missing", name)
    try:
        if datatype == "BYTES":
            flat = np.array([_bytes_element(d) for d in np.ravel(np.array(data, dtype=object))], dtype=object)
        else:
            flat = np.asarray(data, dtype=OIP_TO_NUMPY[datatype]).ravel()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(model, f"data is not {datatype}: {exc}", name) from None
    expected = math.prod(shape)
    if flat.size != expected:
        raise InvalidInputError(model, f"{flat.size} elements given, shape {shape} needs {expected}", name)
    return name, _reshaped(model, name, flat, shape)


def decode_request(model: str, body: Any, signature: Signature | None) -> tuple[dict[str, np.ndarray], dict]:
    """Named tensors and request metadata (``id``, ``outputs``, ``instances``) from a JSON body."""
    if not isinstance(body, dict):
        raise InvalidInputError(model, "the request body must be a JSON object")
    if "instances" in body:
        return _decode_instances(model, body["instances"], signature), {"instances": True}
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError(model, "the body needs 'inputs' (Open Inference Protocol v2) or 'instances'")
    tensors: dict[str, np.ndarray] = {}
    for item in inputs:
        name, arr = _tensor_from_json(model, item)
        if name in tensors:
            raise InvalidInputError(model, "given twice", name)
        tensors[name] = arr
    meta = {"id": body.get("id"), "outputs": body.get("outputs"), "parameters": body.get("parameters")}
    return tensors, meta


def _decode_instances(model: str, instances: Any, signature: Signature | None) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError(model, "'instances' must be a non-empty list")
    if signature is None or not signature.inputs:
        raise InvalidInputError(model, "this model has no tensor signature; send the body it expects")
    specs = {s.name: s for s in signature.inputs}
    if all(isinstance(i, dict) for i in instances):
        columns = {name: [inst.get(name) for inst in instances] for name in specs}
    elif len(specs) == 1:
        columns = {next(iter(specs)): instances}
    else:
        raise InvalidInputError(model, f"model has inputs {sorted(specs)}: each instance must be an object")
    out: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if any(v is None for v in values):
            raise InvalidInputError(model, "missing in some instances", name)
        try:
            out[name] = np.asarray(values, dtype=OIP_TO_NUMPY[specs[name].datatype])
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInputError(model, f"instances are not {specs[name].datatype}: {exc}", name) from None
    return out


def _json_data(arr: np.ndarray) -> list:
    if arr.dtype.kind in "OSU":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
    return arr.ravel().tolist()


def encode_response(model: str, version: str | None, outputs: dict[str, np.ndarray], meta: dict) -> dict:
    """An OIP v2 JSON response, or ``{"predictions": [...]}`` when the request used instances."""
    if meta.get("instances"):
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values())).tolist()}
        n = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]}
    wanted = meta.get("outputs")
    names = [o.get("name") for o in wanted if isinstance(o, dict)] if isinstance(wanted, list) else None
    resp: dict[str, Any] = {"model_name": model}
    if version:
        resp["model_version"] = version
    if meta.get("id") is not None:
        resp["id"] = meta["id"]
    resp["outputs"] = [
        {"name": k, "datatype": oip_datatype(v.dtype), "shape": list(v.shape), "data": _json_data(v)}
        for k, v in outputs.items()
        if names is None or k in names
    ]
    return resp
