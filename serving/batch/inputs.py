"""Decoding batch inputs into named tensors: one file of a ``file`` mapping, or one CSV record of a ``csv`` one.

Everything here is pure (bytes or a path in, numpy out) so it is unit-testable without Ray; the rules are
documented in :mod:`serving.batch`. Every decoder raises :class:`InputError` (or an ``EnginehouseError``) with
a message that ends up as the ``error_message`` of that input's FAILED manifest line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from runtimes.base import Signature, TensorSpec
from runtimes.datatypes import OIP_TO_NUMPY
from serving.dataplane.codec import decode_request

NPY, NPZ, JSON, TXT = ".npy", ".npz", ".json", ".txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
FILE_SUFFIXES = (NPY, NPZ, JSON, TXT, *IMAGE_SUFFIXES)
CSV_SUFFIX = ".csv"
#: channel counts an image-shaped input may have, and the Pillow mode each is converted to
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n"})


class InputError(ValueError):
    """One input cannot be turned into tensors for this model; its message names why."""


@dataclass(frozen=True)
class Decoded:
    """One input's tensors (first dimension = rows) and the request metadata ``encode_response`` needs."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]


def signature_from_dict(data: Mapping[str, Any]) -> Signature:
    """A Signature from its ``as_dict()`` form (what crosses Ray between the probe and the driver)."""

    def specs(items: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in items)

    return Signature(specs(data.get("inputs", ())), specs(data.get("outputs", ())))


def suffix_of(path: str) -> str:
    """The lower-cased extension of a relative path (``""`` when there is none)."""
    return PurePosixPath(path).suffix.lower()


def _only_input(signature: Signature, what: str) -> TensorSpec:
    if len(signature.inputs) != 1:
        names = [t.name for t in signature.inputs]
        raise InputError(f"a {what} file feeds a model with one input; this model has {len(names)}: {names}")
    return signature.inputs[0]


def with_batch_dim(arr: np.ndarray, spec: TensorSpec | None) -> np.ndarray:
    """A tensor as rows: one dimension fewer than the input's shape is one row (a leading 1 is added);
    as many dimensions as the shape means the file already holds a batch of ``arr.shape[0]`` rows."""
    if spec is not None and arr.ndim == len(spec.shape) - 1:
        return arr[np.newaxis, ...]
    return arr


def _load_npy(data: bytes) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):
        raise InputError("not a .npy file (it does not start with the NumPy magic string)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError... for a damaged file
        raise InputError(f"not a readable .npy file: {type(exc).__name__}: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError("not a .npy file (an .npz archive?)")
    return arr


def _load_npz(data: bytes, signature: Signature) -> dict[str, np.ndarray]:
    specs = {t.name: t for t in signature.inputs}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise InputError(f"not a readable .npz archive: {type(exc).__name__}: {exc}") from None
    return {k: with_batch_dim(v, specs.get(k)) for k, v in arrays.items()}


def _load_json(data: bytes, signature: Signature, model: str) -> Decoded:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}") from None
    tensors, meta = decode_request(model, body, signature)
    return Decoded(tensors, meta)


def _load_txt(data: bytes, signature: Signature) -> np.ndarray:
    spec = _only_input(signature, ".txt")
    if spec.datatype != "BYTES":
        raise InputError(f"a .txt file is one BYTES element; input '{spec.name}' is {spec.datatype}")
    return np.array([data], dtype=object).reshape((1,) * max(1, len(spec.shape)))


def image_layout(spec: TensorSpec) -> tuple[str, int, int, int] | None:
    """``(layout, H, W, C)`` of an image-shaped input: [-1,H,W,C] "NHWC", [-1,C,H,W] "NCHW" or [-1,H,W]
    "NHW" (grayscale); C is 1, 3 or 4; H and W may be -1. None when the input is not image-shaped."""
    shape = spec.shape
    if len(shape) == 4 and shape[3] in IMAGE_MODES:
        return "NHWC", shape[1], shape[2], shape[3]
    if len(shape) == 4 and shape[1] in IMAGE_MODES:
        return "NCHW", shape[2], shape[3], shape[1]
    if len(shape) == 3:
        return "NHW", shape[1], shape[2], 1
    return None


def _load_image(data: bytes, signature: Signature) -> np.ndarray:
    spec = _only_input(signature, "image")
    layout = image_layout(spec)
    if layout is None:
        raise InputError(
            f"input '{spec.name}' has shape {list(spec.shape)}, not an image shape ([-1,H,W,C], [-1,C,H,W] or "
            "[-1,H,W] with C 1, 3 or 4)"
        )
    if spec.datatype != "UINT8":
        raise InputError(f"images are decoded as UINT8; input '{spec.name}' is {spec.datatype}")
    kind, h, w, c = layout
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            pixels = np.asarray(img.convert(IMAGE_MODES[c]), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image: {exc}") from None
    got_h, got_w = pixels.shape[:2]
    if (h != -1 and h != got_h) or (w != -1 and w != got_w):
        want = f"{'H' if h == -1 else h}x{'W' if w == -1 else w}"
        raise InputError(f"image is {got_h}x{got_w} (HxW); input '{spec.name}' takes {want}, resize it first")
    if kind == "NHW":
        return pixels[np.newaxis, ...]
    if pixels.ndim == 2:  # mode L
        pixels = pixels[..., np.newaxis]
    if kind == "NCHW":
        pixels = np.transpose(pixels, (2, 0, 1))
    return np.ascontiguousarray(pixels[np.newaxis, ...])


def decode_file(rel: str, data: bytes, signature: Signature, model: str) -> Decoded:
    """Tensors of one input file of a ``file`` mapping, chosen by its extension (see :mod:`serving.batch`)."""
    suffix = suffix_of(rel)
    if suffix == NPY:
        spec = _only_input(signature, ".npy")
        return Decoded({spec.name: with_batch_dim(_load_npy(data), spec)}, {})
    if suffix == NPZ:
        return Decoded(_load_npz(data, signature), {})
    if suffix == JSON:
        return _load_json(data, signature, model)
    if suffix == TXT:
        text = _load_txt(data, signature)
        return Decoded({signature.inputs[0].name: text}, {})
    if suffix in IMAGE_SUFFIXES:
        image = _load_image(data, signature)
        return Decoded({signature.inputs[0].name: image}, {})
    raise InputError(
        f"unsupported file type {suffix or '(no extension)'!r}; expected one of {', '.join(FILE_SUFFIXES)}"
    )


def rows_of(tensors: Mapping[str, np.ndarray]) -> int | None:
    """The common first dimension of every tensor, or None when they disagree (or one is a scalar)."""
    firsts = {arr.shape[0] if arr.ndim else None for arr in tensors.values()}
    if len(firsts) != 1:
        return None
    return next(iter(firsts))


# -- CSV ---------------------------------------------------------------------------------------------------------
Column = str | int


@dataclass(frozen=True)
class CsvRule:
    """A parsed ``mapping_rule``: the columns of each input tensor, whether files start with a header, and the
    delimiter."""

    inputs: dict[str, tuple[Column, ...]]
    header: bool = True
    delimiter: str = ","

    def as_dict(self) -> dict[str, Any]:
        """The rule as given (JSON-friendly), for crossing Ray."""
        return {
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "header": self.header,
            "delimiter": self.delimiter,
        }


def parse_rule(rule: Mapping[str, Any] | None, signature: Signature) -> CsvRule:
    """Validate a ``mapping_rule`` against the model's inputs; ValueError (naming ``mapping_rule``) when unusable.

    ``None`` or ``{}`` is allowed for a one-input model: every column, in order, feeds that input.
    """
    rule = dict(rule or {})
    unknown_keys = sorted(set(rule) - {"inputs", "header", "delimiter"})
    if unknown_keys:
        raise ValueError(f"mapping_rule: unknown key(s) {unknown_keys}; allowed: inputs, header, delimiter")
    header = rule.get("header", True)
    if not isinstance(header, bool):
        raise ValueError(f"mapping_rule.header must be true or false, got {header!r}")
    delimiter = rule.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '\r\n"':
        raise ValueError(f"mapping_rule.delimiter must be one character (not a quote or newline), got {delimiter!r}")
    names = [t.name for t in signature.inputs]
    given = rule.get("inputs")
    if given is None:
        if len(names) != 1:
            raise ValueError(f"mapping_rule.inputs is required: the model has inputs {names}")
        return CsvRule({names[0]: ()}, header, delimiter)
    if not isinstance(given, dict) or not given:
        raise ValueError('mapping_rule.inputs must be an object {"<input name>": [columns...]}')
    unknown = sorted(set(given) - set(names))
    missing = sorted(set(names) - set(given))
    if unknown or missing:
        raise ValueError(
            f"mapping_rule.inputs must name exactly the model's inputs {names}; unknown {unknown}, missing {missing}"
        )
    inputs: dict[str, tuple[Column, ...]] = {}
    for name, cols in given.items():
        seq = [cols] if isinstance(cols, str | int) else cols
        if not isinstance(seq, list) or not seq:
            raise ValueError(f"mapping_rule.inputs.{name} must be a column or a non-empty list of columns")
        for col in seq:
            if isinstance(col, bool) or not isinstance(col, str | int) or (isinstance(col, int) and col < 0):
                raise ValueError(
                    f"mapping_rule.inputs.{name}: {col!r} is neither a header name nor a column index >= 0"
                )
            if isinstance(col, str) and not header:
                raise ValueError(f"mapping_rule.inputs.{name}: column {col!r} is a name but header is false")
        inputs[name] = tuple(seq)
    return CsvRule(inputs, header, delimiter)


def csv_inputs(path: Path, rule: CsvRule) -> Iterator[tuple[int, dict[str, list[str]] | None, str | None]]:
    """Every input of one CSV file: ``(row, {input: [cells]}, None)`` or ``(row, None, error)``.

    ``row`` is the 1-based number of the record after the header (blank records keep their number but are not
    inputs); row 0 stands for the file itself when it cannot be opened. Bytes that are not UTF-8 survive as
    surrogates, so they fail a numeric cast and round-trip into BYTES inputs unchanged.
    """
    try:
        f = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        yield 0, None, f"cannot read {path.name}: {exc.strerror or exc}"
        return
    with f:
        reader = csv.reader(f, delimiter=rule.delimiter)
        index: dict[str, list[int]] = {}
        missing_header: str | None = None
        header_done = not rule.header
        row = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # framing trouble: this record fails, the reader carries on at the next line
                if not header_done:
                    yield 0, None, f"malformed CSV header (line {reader.line_num}): {exc}"
                    return
                row += 1
                yield row, None, f"malformed CSV record ending at line {reader.line_num}: {exc}"
                continue
            except OSError as exc:
                row += 1
                yield row, None, f"cannot read {path.name}: {exc.strerror or exc}"
                return
            if not header_done:
                if not record:
                    continue
                header_done = True
                names = [c.strip() for c in record]
                missing_header = _resolve_columns(rule, names, index)
                continue
            row += 1
            if not record or record == [""]:
                continue
            if missing_header is not None:
                yield row, None, missing_header
                continue
            yield _select(row, record, rule, index)


def _resolve_columns(rule: CsvRule, header: list[str], index: dict[str, list[int]]) -> str | None:
    for name, cols in rule.inputs.items():
        idx: list[int] = []
        for col in cols:
            if isinstance(col, int):
                idx.append(col)
            elif col in header:
                idx.append(header.index(col))
            else:
                shown = header if len(header) <= 20 else [*header[:20], "..."]
                return f"column {col!r} (input '{name}') is not in the CSV header {shown}"
        index[name] = idx
    return None


def _select(
    row: int, record: list[str], rule: CsvRule, index: dict[str, list[int]]
) -> tuple[int, dict[str, list[str]] | None, str | None]:
    out: dict[str, list[str]] = {}
    for name, cols in rule.inputs.items():
        if not cols:  # the one-input default: every column in order
            out[name] = record
            continue
        cells: list[str] = []
        for col, i in zip(cols, index.get(name) or [c for c in cols if isinstance(c, int)], strict=True):
            if i >= len(record):
                return row, None, f"column {col!r} (input '{name}') is missing: the record has {len(record)} columns"
            cells.append(record[i])
        out[name] = cells
    return row, out, None


def _cast(value: str, datatype: str) -> Any:
    text = value.strip()
    if datatype == "BYTES":
        return value
    if datatype == "BOOL":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError
    if datatype.startswith("FP"):
        return float(text)
    return int(text)


def cast_cells(cells: Mapping[str, list[str]], signature: Signature) -> dict[str, list[Any]]:
    """The selected cells of one record as JSON-friendly values of each input's datatype; InputError names the
    first cell that is not one."""
    specs = {t.name: t for t in signature.inputs}
    out: dict[str, list[Any]] = {}
    for name, values in cells.items():
        datatype = specs[name].datatype
        try:
            out[name] = [_cast(v, datatype) for v in values]
        except ValueError:
            bad = next(v for v in values if not _castable(v, datatype))
            raise InputError(f"input '{name}' is {datatype}: value {bad!r} is not one") from None
    return out


def _castable(value: str, datatype: str) -> bool:
    try:
        _cast(value, datatype)
    except ValueError:
        return False
    return True


def tensors_from_values(values: Mapping[str, list[Any]], signature: Signature) -> dict[str, np.ndarray]:
    """One row per input: the values cast to the datatype and shaped ``(1, *shape[1:])`` (one -1 is filled)."""
    specs = {t.name: t for t in signature.inputs}
    out: dict[str, np.ndarray] = {}
    for name, vals in values.items():
        spec = specs[name]
        target = (1, *spec.shape[1:])
        try:
            if spec.datatype == "BYTES":
                arr = np.array([v.encode("utf-8", "surrogateescape") for v in vals], dtype=object)
            else:
                arr = np.array(vals, dtype=OIP_TO_NUMPY[spec.datatype])
            if len(target) == 1:  # a [-1] input: one value per row
                if arr.size != 1:
                    raise ValueError
                out[name] = arr.reshape(1)
            else:
                out[name] = arr.reshape(target)
        except OverflowError:
            raise InputError(f"input '{name}': a value is out of range for {spec.datatype}") from None
        except ValueError:
            dims = [d for d in spec.shape[1:] if d != -1]
            need = math.prod(dims) if len(dims) == len(spec.shape) - 1 else None
            raise InputError(
                f"input '{name}' has shape {list(spec.shape)}: {len(vals)} column(s) cannot fill one row"
                + (f" ({need} needed)" if need is not None else "")
            ) from None
    return out
