"""Accelerator discovery against a fake NVML library and a fake NPU plugin installed as a real entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runtimes.accelerators import GpuInfo, NpuDevice, detect_gpus, detect_npus, ray_resources
from tests.runtimes.fakes import fake_pynvml, install_fake_npu_plugin


def test_detect_gpus_reports_every_gpu_and_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus = detect_gpus()
    assert [g.index for g in gpus] == [0, 1]
    first = gpus[0]
    assert isinstance(first, GpuInfo)
    assert first.name == "NVIDIA A30"
    assert first.uuid == "GPU-aaaa"
    assert first.memory_total == 24 * 2**30 and first.memory_used == 2**30
    assert first.utilization == 37
    assert first.power == pytest.approx(90.5)
    assert first.driver_version == "550.54.15"
    assert first.cuda_version == "12.4"
    assert nvml.state["shutdowns"] == 1 and not nvml.state["initialised"]


def test_unsupported_field_is_none_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_supported=False))
    gpus = detect_gpus()
    assert len(gpus) == 2
    assert all(g.power is None for g in gpus)
    assert gpus[0].memory_total == 24 * 2**30


@pytest.mark.parametrize("code", [12, 9])  # LibraryNotFound, DriverNotLoaded
def test_nvml_init_failure_means_no_gpu(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=code))
    assert detect_gpus() == []
    assert ray_resources(npus=[])["num_gpus"] == 0


def test_zero_gpus_and_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus=[]))
    assert detect_gpus() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # None in sys.modules makes the import fail
    assert detect_gpus() == []


def test_real_pynvml_on_this_machine_does_not_raise() -> None:
    # Whatever the host has (here: no GPU, no driver), discovery answers a list.
    assert isinstance(detect_gpus(), list)


def test_detect_npus_from_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npu_plugin(tmp_path, monkeypatch)
    npus = detect_npus()
    assert len(npus) == 2
    assert all(isinstance(n, NpuDevice) for n in npus)
    assert {n.name for n in npus} == {"SNT9"}
    assert npus[0].resource_name == "huawei.com/ascend-snt9"
    assert npus[0].driver_version == "C8x"


def test_raising_plugin_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_fake_npu_plugin(
        tmp_path,
        monkeypatch,
        entry_points=(
            "broken = fake_npu_plugin:BrokenPlugin\nfake = fake_npu_plugin:FakeAscend\n"
            "missing = fake_npu_plugin:NoSuchClass"
        ),
    )
    npus = detect_npus()
    assert len(npus) == 2  # the working plugin still counts
    assert "broken" in caplog.text and "missing" in caplog.text


def test_no_plugin_means_no_npu() -> None:
    assert detect_npus() == []


def test_ray_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    install_fake_npu_plugin(tmp_path, monkeypatch)
    assert ray_resources() == {"num_gpus": 2, "resources": {"huawei.com/ascend-snt9": 2.0}}
