"""Open Inference Protocol v2 datatypes and their numpy equivalents."""

from __future__ import annotations

import numpy as np

#: OIP v2 datatype name -> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}
# numpy fixed-width strings are BYTES too
NUMPY_KINDS_AS_BYTES = ("S", "U", "O")


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for an OIP datatype; ``KeyError`` names the unknown one."""
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        raise KeyError(f"unknown datatype {datatype!r}; expected one of {', '.join(OIP_TO_NUMPY)}") from None


def oip_datatype(dtype: np.dtype | type) -> str:
    """The OIP datatype for a numpy dtype (strings and objects are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in NUMPY_KINDS_AS_BYTES:
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dt]
    except KeyError:
        raise KeyError(f"numpy dtype {dt} has no Open Inference Protocol datatype") from None


def element_size(datatype: str) -> int | None:
    """Bytes per element, or None for BYTES (variable length)."""
    if datatype == "BYTES":
        return None
    return OIP_TO_NUMPY[datatype].itemsize
