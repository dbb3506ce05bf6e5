"""The runtime catalogue of ``GET /v1/{project_id}/models/ai-engine-runtimes``, built from what is really
installed and detected here.

The catalogue is declared as data (:data:`CATALOGUE`); :func:`build_catalogue` expands it against the
installed packages and the detected accelerators into exactly the ModelArts response shape (see
``reference/modelarts-ai-engine-runtimes.txt``): per engine, parallel arrays with one element per
(runtime, request mode) pair, as the reference lists sync and async variants as separate entries.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from dataclasses import dataclass
from typing import Any

from runtimes.accelerators import GpuInfo, NpuDevice, detect_gpus, detect_npus
from runtimes.registry import ENGINES, engine_available

REQUEST_MODES = ("sync", "async")


@dataclass(frozen=True)
class EngineRuntimes:
    """How the runtimes of one engine are named and on which accelerators they may run."""

    engine: str
    prefix: str  # first word of the runtime name, e.g. "pytorch"
    gpu: bool  # a CUDA variant is offered when a GPU is detected
    npu: bool  # a CANN variant is offered per NPU model a plugin reports
    image_source: str  # "base_image": runs in-process from the installed package; "custom": user image


# Order is the order of the response; Custom is last, as in the reference.
CATALOGUE: tuple[EngineRuntimes, ...] = (
    EngineRuntimes("PyTorch", "pytorch", gpu=True, npu=True, image_source="base_image"),
    EngineRuntimes("TensorFlow", "tensorflow", gpu=True, npu=False, image_source="base_image"),
    EngineRuntimes("ONNX", "onnxruntime", gpu=True, npu=False, image_source="base_image"),
    EngineRuntimes("MindSpore", "mindspore", gpu=True, npu=True, image_source="base_image"),
    EngineRuntimes("Custom", "custom", gpu=True, npu=True, image_source="custom"),
)


def _arch() -> str:
    # ModelArts names the architectures x86_64 and aarch64; macOS and Windows say arm64 / AMD64.
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine or "x86_64")


def _py() -> str:
    return f"py_{sys.version_info.major}.{sys.version_info.minor}"


def engine_version(engine: str) -> str | None:
    """The installed version of an engine's distribution (read from metadata, never imported)."""
    distribution = ENGINES[engine].distribution
    if distribution is None:
        return None
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version.split("+", 1)[0]  # "2.13.0+cpu": the build tag is already said by "-cpu"/"-cuda_x"


def engine_status(engine: str) -> tuple[str, str | None]:
    """``("normal", None)`` or ``("unavailable", why and how to install it)`` for an engine."""
    if engine_available(engine):
        return "normal", None
    entry = ENGINES[engine]
    return "unavailable", (f"package '{entry.framework}' is not installed: pip install 'enginehouse[{entry.extra}]'")


def _gpu_short_name(name: str) -> str:
    # "NVIDIA A30" -> "a30", the form of the reference's example accelerator name.
    short = name.removeprefix("NVIDIA").strip() or name
    return short.lower().replace(" ", "-")


def _variants(spec: EngineRuntimes, gpus: list[GpuInfo], npus: list[NpuDevice]) -> list[tuple[str, dict]]:
    """The (runtime name, accelerator) pairs of one engine on this machine."""
    version = engine_version(spec.engine)
    head = f"{spec.prefix}_{version}" if version else spec.prefix
    tail = f"{_py()}-{_arch()}"
    variants: list[tuple[str, dict]] = [(f"{head}-cpu-{tail}", {"type": "none"})]
    if spec.gpu and gpus:
        models = sorted({(_gpu_short_name(g.name), g.cuda_version or "unknown") for g in gpus})
        for short, cuda in models:
            # Only suffix the model when several differ, so the common single-model name stays short.
            suffix = f"-{short}" if len(models) > 1 else ""
            accel = {"type": "gpu", "name": short, "cuda_version": f"cuda {cuda}"}
            variants.append((f"{head}-cuda_{cuda}-{tail}{suffix}", accel))
    if spec.npu and npus:
        models_npu = sorted({(n.name, n.driver_version or "unknown") for n in npus})
        for name, driver in models_npu:
            accel = {"type": "npu", "name": name, "driver_version_section": driver}
            variants.append((f"{head}-cann-{tail}-{name.lower()}", accel))
    return variants


def build_catalogue(gpus: list[GpuInfo] | None = None, npus: list[NpuDevice] | None = None) -> dict[str, Any]:
    """The whole catalogue in the reference shape; accelerators are detected when not given."""
    gpus = detect_gpus() if gpus is None else gpus
    npus = detect_npus() if npus is None else npus
    arch = _arch()
    engine_runtimes = []
    for spec in CATALOGUE:
        status, _ = engine_status(spec.engine)
        item: dict[str, Any] = {
            "ai_engine": spec.engine,
            "runtimes": [],
            "request_mode": [],
            "accelerators": [],
            "arch": [],
            "status_list": [],
            "image_source": [],
        }
        for runtime, accel in _variants(spec, gpus, npus):
            for mode in REQUEST_MODES:
                item["runtimes"].append(runtime)
                item["request_mode"].append(mode)
                item["accelerators"].append(dict(accel))
                item["arch"].append(arch)
                item["status_list"].append(status)
                item["image_source"].append(spec.image_source)
        engine_runtimes.append(item)
    return {"count": len(engine_runtimes), "total_count": len(engine_runtimes), "engine_runtimes": engine_runtimes}


def _non_negative_int(value: int | str | None, field: str, default: int | None) -> int | None:
    # The API declares limit/offset as strings; a bad one is the caller's 400, named by field.
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be an integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{field} must be >= 0, got {number}")
    return number


def paginate(catalogue: dict[str, Any], limit: int | str | None = None, offset: int | str | None = 0) -> dict[str, Any]:
    """One page of ``engine_runtimes``: ``count`` items on it, ``total_count`` in all; ValueError if bad."""
    items = catalogue["engine_runtimes"]
    start = _non_negative_int(offset, "offset", 0) or 0
    size = _non_negative_int(limit, "limit", None)
    page = items[start:] if size is None else items[start : start + size]
    return {"count": len(page), "total_count": len(items), "engine_runtimes": page}


def find_runtime(engine: str, runtime_name: str, catalogue: dict[str, Any] | None = None) -> bool:
    """True when the catalogue lists ``runtime_name`` for ``engine`` (whatever its status)."""
    catalogue = build_catalogue() if catalogue is None else catalogue
    return any(
        item["ai_engine"] == engine and runtime_name in item["runtimes"] for item in catalogue["engine_runtimes"]
    )


def print_catalogue(as_json: bool = False) -> None:
    """Print the catalogue for ``enginehouse runtimes``: JSON, or a table saying why an engine is off."""
    catalogue = build_catalogue()
    if as_json:
        print(json.dumps(catalogue, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Enginehouse runtimes")
    for column in ("engine", "runtime", "mode", "accelerator", "arch", "status", "source"):
        table.add_column(column, overflow="fold")  # runtime names are long and must stay copyable
    for item in catalogue["engine_runtimes"]:
        _, why = engine_status(item["ai_engine"])
        for i, runtime in enumerate(item["runtimes"]):
            accel = item["accelerators"][i]
            label = (
                accel["type"]
                if accel["type"] == "none"
                else (
                    f"{accel['type']} {accel.get('name', '')} "
                    f"{accel.get('cuda_version') or accel.get('driver_version_section', '')}"
                ).strip()
            )
            status = item["status_list"][i]
            table.add_row(
                item["ai_engine"],
                runtime,
                item["request_mode"][i],
                label,
                item["arch"][i],
                f"{status} ({why})" if why else status,
                item["image_source"][i],
            )
    Console().print(table)
