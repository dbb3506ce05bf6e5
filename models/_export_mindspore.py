"""Export the example MLP as a MindSpore MindIR file with a dynamic batch dimension."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from models.mlp_weights import HIDDEN, IN, INPUT_NAME, OUT, OUTPUT_NAME, mlp_weights

MODEL_FILE = "model.mindir"
SIGNATURE_FILE = "signature.json"


def mindspore_runtime_name() -> str:
    """Catalogue runtime name of the installed MindSpore, e.g. ``mindspore_2.10.0-cpu-py_3.11-x86_64``."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"mindspore_{metadata.version('mindspore')}-cpu-py_{py}-{platform.machine()}"


def build_mlp_cell():  # type: ignore[no-untyped-def]  # mindspore is optional, so no annotation
    """The example MLP as a MindSpore ``nn.Cell`` carrying :func:`mlp_weights`."""
    import mindspore as ms
    from mindspore import nn

    w = mlp_weights()

    class MLP(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            # nn.Dense computes x @ W.T + b with W [out, in]; our weights are [in, out], hence .T
            self.d1 = nn.Dense(IN, HIDDEN, weight_init=ms.Tensor(w["w1"].T.copy()), bias_init=ms.Tensor(w["b1"]))
            self.d2 = nn.Dense(HIDDEN, OUT, weight_init=ms.Tensor(w["w2"].T.copy()), bias_init=ms.Tensor(w["b2"]))
            self.relu = nn.ReLU()

        def construct(self, x):  # type: ignore[no-untyped-def]
            return self.d2(self.relu(self.d1(x)))

    return MLP()


def build_mindir(version_dir: Path) -> Path:
    """Write ``model.mindir``, ``signature.json`` and ``config.json`` into version_dir; returns the file."""
    import mindspore as ms

    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    ms.set_device("CPU")
    cell = build_mlp_cell()
    # a None batch dim exports a truly dynamic batch (checked on CPU with mindspore 2.10: 1, 3, 7 rows work)
    example = ms.Tensor(shape=[None, IN], dtype=ms.float32)
    stem = version_dir / Path(MODEL_FILE).stem
    ms.export(cell, example, file_name=str(stem), file_format="MINDIR")
    out = version_dir / MODEL_FILE
    # mindspore.export writes the file owner-read-only (0400); serving images copy it and run as another
    # user, and rebuilding over it must work, so make it an ordinary readable file
    out.chmod(0o644)
    # MindIR graph input names are opaque (e.g. "x" may become a generated parameter name), so the
    # serving names and types travel beside the file
    signature = {
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, IN]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, OUT]}],
    }
    (version_dir / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
    config = {"engine": "MindSpore", "runtime": mindspore_runtime_name(), "model_file": MODEL_FILE}
    (version_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
