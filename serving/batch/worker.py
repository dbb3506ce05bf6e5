"""What runs inside Ray Data: the CSV expander (tasks) and the inference worker (one per actor of the pool).

:class:`InferWorker` loads the same engine adapter a real-time replica uses (``runtimes.registry.load_model``)
once per actor, then for each Ray Data batch of inputs: decodes every input, validates it against the signature,
groups inputs of the same per-row shape, stacks each group up to ``max_batch_size`` rows, calls
``adapter.infer`` once per group, splits the rows back, writes one OIP v2 result file per input (atomically:
a temporary file renamed into place) and returns one status row per input for the driver's manifest.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from runtimes.base import ModelConfig, Placement
from runtimes.errors import EnginehouseError
from serving.batch.inputs import (
    CsvRule,
    Decoded,
    InputError,
    cast_cells,
    csv_inputs,
    decode_file,
    rows_of,
    signature_from_dict,
    tensors_from_values,
)
from serving.dataplane.codec import encode_response

#: rows the CSV expander puts in one block
CSV_CHUNK = 1024


def error_text(exc: BaseException) -> str:
    """The message of an exception as it goes into a manifest line."""
    if isinstance(exc, EnginehouseError | InputError):
        text = str(getattr(exc, "message", None) or exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return clean(text)


def clean(text: str) -> str:
    """Text safe for Arrow and JSON: a lone surrogate (bytes that were not UTF-8) becomes a ``\\udcXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def csv_source(rel: str, row: int) -> str:
    """The source id of one CSV input: ``"<relative path>#<row>"``; row 0 (the file itself) is the path alone."""
    return f"{rel}#{row}" if row else rel


def result_path(dest: Path, source: str, mapping_type: str) -> Path:
    """Where an input's result goes: ``a/b.npy`` -> ``a/b.npy.json``; ``d.csv#7`` -> ``d.csv/7.json``."""
    if mapping_type == "csv":
        rel, _, row = source.rpartition("#")
        return dest / rel / f"{row}.json"
    return dest / f"{source}.json"


def parse_ranges(text: str) -> set[int]:
    """``"0-3,7,9-10"`` -> {0, 1, 2, 3, 7, 9, 10}."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def format_ranges(rows: set[int]) -> str:
    """The inverse of :func:`parse_ranges`, compact for runs of consecutive rows."""
    parts: list[str] = []
    ordered = sorted(rows)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=object)


def expand_csv(
    batch: dict[str, np.ndarray], *, src_path: str, rule: dict[str, Any], signature: dict[str, Any]
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: CSV files (``path``, ``skip`` row ranges) -> one row per input (``source``, ``values``
    as JSON of the cast cells, or ``error``); rows already in the manifest are left out."""
    parsed = CsvRule({k: tuple(v) for k, v in rule["inputs"].items()}, bool(rule["header"]), str(rule["delimiter"]))
    sig = signature_from_dict(signature)
    src = Path(src_path)
    for rel, skip in zip(batch["path"], batch["skip"], strict=True):
        done = parse_ranges(str(skip))
        sources: list[str] = []
        values: list[str] = []
        errors: list[str] = []
        for row, cells, error in csv_inputs(src / str(rel), parsed):
            if row in done:
                continue
            if cells is not None:
                try:
                    values.append(json.dumps(cast_cells(cells, sig)))
                except InputError as exc:
                    values.append("")
                    error = str(exc)
                else:
                    error = ""
            else:
                values.append("")
            sources.append(csv_source(str(rel), row))
            errors.append(clean(error or ""))
            if len(sources) >= CSV_CHUNK:
                yield {"source": _strings(sources), "values": _strings(values), "error": _strings(errors)}
                sources, values, errors = [], [], []
        if sources:
            yield {"source": _strings(sources), "values": _strings(values), "error": _strings(errors)}


@dataclass
class _Item:
    index: int
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    rows: int | None


class InferWorker:
    """The callable class of the actor pool (``map_batches(InferWorker, compute=ActorPoolStrategy(...))``)."""

    def __init__(
        self,
        *,
        model_dir: str,
        config: dict[str, Any] | None,
        model_name: str,
        model_version: str | None,
        src_path: str,
        dest_path: str,
        mapping_type: str,
        max_batch_size: int,
        cpu_threads: int,
        cpus: float | None = None,
    ) -> None:
        import ray

        from runtimes.registry import load_model

        gpu_ids = tuple(int(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else ()
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so the first one is cuda:0 in here
        placement = Placement(
            device="cuda:0" if gpu_ids else "cpu", cpu_threads=max(1, cpu_threads), gpu_ids=gpu_ids, cpus=cpus
        )
        self.loop = asyncio.new_event_loop()
        self.adapter = self.loop.run_until_complete(
            load_model(
                model_dir,
                name=model_name,
                placement=placement,
                config=ModelConfig.model_validate(config) if config is not None else None,
            )
        )
        assert self.adapter.signature is not None
        self.signature = self.adapter.signature
        self.model_name = model_name
        self.model_version = model_version
        self.src = Path(src_path)
        self.dest = Path(dest_path)
        self.mapping_type = mapping_type
        self.max_batch_size = max_batch_size
        # stacking needs a free first dimension on every input; cleared if the model turns out not row-wise
        self.row_wise = bool(self.signature.inputs) and all(
            len(t.shape) >= 1 and t.shape[0] == -1 for t in self.signature.inputs
        )
        self._dirs: set[Path] = set()

    # -- decoding ---------------------------------------------------------------------------------------------
    def _decode(self, batch: dict[str, np.ndarray], i: int) -> Decoded:
        source = str(batch["source"][i])
        if self.mapping_type == "csv":
            error = str(batch["error"][i])
            if error:
                raise InputError(error)
            values = json.loads(str(batch["values"][i]))
            return Decoded(tensors_from_values(values, self.signature), {})
        try:
            data = (self.src / source).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
        return decode_file(source, data, self.signature, self.model_name)

    # -- inference ----------------------------------------------------------------------------------------------
    def _infer(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.loop.run_until_complete(self.adapter.infer(tensors))

    def _infer_one(self, item: _Item) -> dict[str, np.ndarray] | BaseException:
        try:
            return self._infer(item.tensors)
        except Exception as exc:
            return exc

    def _infer_group(self, items: list[_Item]) -> list[dict[str, np.ndarray] | BaseException]:
        if len(items) == 1:
            return [self._infer_one(items[0])]
        stacked = {k: np.concatenate([it.tensors[k] for it in items], axis=0) for k in items[0].tensors}
        total = sum(it.rows or 0 for it in items)
        try:
            out = self._infer(stacked)
        except Exception:  # one bad input spoils the stack: run each alone so only it fails
            return [self._infer_one(it) for it in items]
        if any(v.ndim == 0 or v.shape[0] != total for v in out.values()):
            self.row_wise = False  # outputs do not follow the input rows: never stack again
            return [self._infer_one(it) for it in items]
        results: list[dict[str, np.ndarray] | BaseException] = []
        start = 0
        for it in items:
            stop = start + (it.rows or 0)
            results.append({k: v[start:stop] for k, v in out.items()})
            start = stop
        return results

    def _groups(self, items: list[_Item]) -> Iterator[list[_Item]]:
        """Items of the same per-row shapes and datatypes, packed up to max_batch_size rows; an item that
        cannot be stacked (or is larger than max_batch_size by itself) is a group of one."""
        open_groups: dict[tuple[Any, ...], tuple[list[_Item], int]] = {}
        for it in items:
            if not self.row_wise or it.rows is None or it.rows < 1 or it.rows >= self.max_batch_size:
                yield [it]
                continue
            key = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in it.tensors.items()))
            group, rows = open_groups.get(key, ([], 0))
            if rows + it.rows > self.max_batch_size:
                yield group
                group, rows = [], 0
            group.append(it)
            open_groups[key] = (group, rows + it.rows)
        for group, _ in open_groups.values():
            if group:
                yield group

    # -- results ------------------------------------------------------------------------------------------------
    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        tmp = parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(orjson.dumps(payload))
        os.replace(tmp, path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = [str(s) for s in batch["source"]]
        n = len(sources)
        ok = [False] * n
        locs = [""] * n
        errors = [""] * n
        items: list[_Item] = []
        for i in range(n):
            try:
                decoded = self._decode(batch, i)
                checked = self.adapter.validate(decoded.tensors)
            except Exception as exc:
                errors[i] = error_text(exc)
                continue
            items.append(_Item(i, checked, decoded.meta, rows_of(checked)))
        for group in self._groups(items):
            for it, result in zip(group, self._infer_group(group), strict=True):
                if isinstance(result, BaseException):
                    errors[it.index] = error_text(result)
                    continue
                path = result_path(self.dest, sources[it.index], self.mapping_type)
                try:
                    self._write(path, encode_response(self.model_name, self.model_version, result, it.meta))
                except (OSError, TypeError, ValueError) as exc:
                    errors[it.index] = clean(f"cannot write the result {path}: {exc}")
                    continue
                ok[it.index] = True
                locs[it.index] = str(path)
        return {
            "source": _strings([clean(s) for s in sources]),
            "ok": np.array(ok, dtype=bool),
            "loc": _strings(locs),
            "error": _strings(errors),
        }
