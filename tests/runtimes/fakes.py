"""Fakes of the two outer boundaries of accelerator discovery: the NVML library and an NPU vendor plugin.

Only these are faked; everything of ours runs for real against them.
"""

from __future__ import annotations

import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest


class FakeNVMLError(Exception):
    """Stands in for ``pynvml.NVMLError`` (our code catches whatever ``pynvml.NVMLError`` is)."""

    def __init__(self, value: int = 999) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Rates:
    gpu: int
    memory: int


def fake_pynvml(
    gpus: list[dict] | None = None, init_error: int | None = None, power_supported: bool = True
) -> types.ModuleType:
    """A module object with the pynvml functions detect_gpus calls, reporting ``gpus``."""
    gpus = (
        gpus
        if gpus is not None
        else [
            {"name": "NVIDIA A30", "uuid": "GPU-aaaa", "total": 24 * 2**30, "used": 2**30, "util": 37, "mw": 90_500},
            {"name": "NVIDIA A30", "uuid": "GPU-bbbb", "total": 24 * 2**30, "used": 0, "util": 0, "mw": 31_000},
        ]
    )
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError
    state = {"initialised": False, "shutdowns": 0}
    mod.state = state

    def init() -> None:
        if init_error is not None:
            raise FakeNVMLError(init_error)  # 12 = NVML_ERROR_LIBRARY_NOT_FOUND, 9 = DRIVER_NOT_LOADED
        state["initialised"] = True

    def shutdown() -> None:
        state["initialised"] = False
        state["shutdowns"] += 1

    def need_init() -> None:
        if not state["initialised"]:
            raise FakeNVMLError(1)  # NVML_ERROR_UNINITIALIZED, as the real library

    def power(handle: int) -> int:
        need_init()
        if not power_supported:
            raise FakeNVMLError(3)  # NVML_ERROR_NOT_SUPPORTED, e.g. on some vGPU boards
        return gpus[handle]["mw"]

    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = lambda: (need_init(), len(gpus))[1]
    mod.nvmlSystemGetDriverVersion = lambda: (need_init(), "550.54.15")[1]
    mod.nvmlSystemGetCudaDriverVersion = lambda: (need_init(), 12040)[1]
    mod.nvmlDeviceGetHandleByIndex = lambda i: (need_init(), i)[1]
    mod.nvmlDeviceGetName = lambda h: (need_init(), gpus[h]["name"])[1]
    mod.nvmlDeviceGetUUID = lambda h: (need_init(), gpus[h]["uuid"])[1]
    mod.nvmlDeviceGetMemoryInfo = lambda h: (
        need_init(),
        _Memory(gpus[h]["total"], gpus[h]["used"], gpus[h]["total"] - gpus[h]["used"]),
    )[1]
    mod.nvmlDeviceGetUtilizationRates = lambda h: (need_init(), _Rates(gpus[h]["util"], 5))[1]
    mod.nvmlDeviceGetPowerUsage = power
    return mod


FAKE_PLUGIN = textwrap.dedent('''
    """A fake Ascend NPU plugin, installed as a real distribution with an entry point."""
    from runtimes.accelerators import NpuDevice


    class FakeAscend:
        def detect(self):
            return [
                NpuDevice(index=i, name="SNT9", resource_name="huawei.com/ascend-snt9",
                          memory_total=64 * 2**30, memory_used=0, utilization=0, driver_version="C8x")
                for i in range(2)
            ]


    class BrokenPlugin:
        def detect(self):
            raise RuntimeError("driver exploded")
''')


def install_fake_npu_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry_points: str = "fake = fake_npu_plugin:FakeAscend"
) -> Path:
    """Write the plugin module and its ``.dist-info`` into ``tmp_path`` and put it on ``sys.path``."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "fake_npu_plugin.py").write_text(FAKE_PLUGIN)
    info = root / "fake_npu_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-npu-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[enginehouse.accelerators]\n{entry_points}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(__import__("sys").modules, "fake_npu_plugin", raising=False)
    return root
