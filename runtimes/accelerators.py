"""Accelerator discovery: NVIDIA GPUs through NVML, NPUs through plugins found as Python entry points.

Discovery never breaks start-up: a machine with no GPU, no NVML library or a broken NPU plugin simply
reports fewer accelerators. The results feed the runtime catalogue, the pool/node resources and
``ray.init`` (see :func:`ray_resources`).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

log = logging.getLogger(__name__)

#: Entry-point group an NPU vendor package registers its :class:`AcceleratorPlugin` under.
ENTRY_POINT_GROUP = "enginehouse.accelerators"

T = TypeVar("T")


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it; a field NVML cannot give on this board is None."""

    index: int
    name: str
    uuid: str | None
    memory_total: int | None  # bytes
    memory_used: int | None  # bytes
    utilization: int | None  # percent
    power: float | None  # watts
    driver_version: str | None
    cuda_version: str | None  # e.g. "12.4"


@dataclass(frozen=True)
class NpuDevice:
    """One NPU as an accelerator plugin reports it."""

    index: int
    name: str  # e.g. "SNT9"
    resource_name: str  # the node/Ray resource key, e.g. "huawei.com/ascend-snt9"
    memory_total: int | None = None  # bytes
    memory_used: int | None = None  # bytes
    utilization: int | None = None  # percent
    driver_version: str | None = None


@runtime_checkable
class AcceleratorPlugin(Protocol):
    """What an ``enginehouse.accelerators`` entry point loads (a class or an instance)."""

    def detect(self) -> list[NpuDevice]:
        """Every device of this kind on this machine; an empty list when there is none."""
        ...


def _text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(nvml: Any, fn: Callable[..., T], *args: Any) -> T | None:
    """The value of one NVML query, or None when this board or driver does not support it."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        log.debug("NVML query failed: %s", exc)
        return None


def _cuda_version(nvml: Any) -> str | None:
    # NVML encodes the CUDA driver version as 1000*major + 10*minor (12040 -> "12.4").
    raw = _field(nvml, nvml.nvmlSystemGetCudaDriverVersion)
    if raw is None:
        return None
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def detect_gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs NVML sees; an empty list when there is no GPU, driver or NVML library."""
    try:
        import pynvml as nvml
    except ImportError:
        return []
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, ...: a machine without GPUs
        log.info("no NVIDIA GPU: %s", exc)
        return []
    except OSError as exc:  # a broken libnvidia-ml install can fail before NVML maps its errors
        log.info("no NVIDIA GPU: %s", exc)
        return []
    try:
        count = _field(nvml, nvml.nvmlDeviceGetCount) or 0
        driver = _field(nvml, nvml.nvmlSystemGetDriverVersion)
        driver_version = _text(driver) if driver is not None else None
        cuda_version = _cuda_version(nvml)
        gpus = []
        for index in range(count):
            handle = _field(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue  # a lost GPU is skipped, the others are still reported
            name = _field(nvml, nvml.nvmlDeviceGetName, handle)
            uuid = _field(nvml, nvml.nvmlDeviceGetUUID, handle)
            memory = _field(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            rates = _field(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            milliwatts = _field(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(name) if name is not None else "unknown",
                    uuid=_text(uuid) if uuid is not None else None,
                    memory_total=int(memory.total) if memory is not None else None,
                    memory_used=int(memory.used) if memory is not None else None,
                    utilization=int(rates.gpu) if rates is not None else None,
                    power=milliwatts / 1000.0 if milliwatts is not None else None,
                    driver_version=driver_version,
                    cuda_version=cuda_version,
                )
            )
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def _as_device(item: Any) -> NpuDevice:
    # A plugin may return our dataclass or a plain dict of its fields (no import of enginehouse needed).
    if isinstance(item, NpuDevice):
        return item
    if isinstance(item, dict):
        return NpuDevice(**item)
    raise TypeError(f"expected NpuDevice or dict, got {type(item).__name__}")


def detect_npus() -> list[NpuDevice]:
    """The NPUs every installed ``enginehouse.accelerators`` plugin reports; a failing plugin is skipped."""
    devices: list[NpuDevice] = []
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in seen:  # the same distribution reachable twice on sys.path
            continue
        seen.add(ep.value)
        try:
            obj = ep.load()
            plugin = obj() if isinstance(obj, type) else obj
            found = [_as_device(item) for item in plugin.detect()]
        except Exception:  # a vendor plugin must never stop the server from starting
            log.warning("accelerator plugin %r (%s) failed; skipped", ep.name, ep.value, exc_info=True)
            continue
        devices.extend(found)
    return devices


def ray_resources(gpus: list[GpuInfo] | None = None, npus: list[NpuDevice] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.init``: ``num_gpus`` and the NPUs as custom ``resources``."""
    gpus = detect_gpus() if gpus is None else gpus
    npus = detect_npus() if npus is None else npus
    counts = Counter(device.resource_name for device in npus)
    return {"num_gpus": len(gpus), "resources": {name: float(n) for name, n in counts.items()}}
