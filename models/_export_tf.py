"""Export the example MLP as a TensorFlow SavedModel with a ``serving_default`` signature."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from models.mlp_weights import IN, INPUT_NAME, OUTPUT_NAME, mlp_weights

MODEL_FILE = "saved_model"


def tensorflow_runtime_name() -> str:
    """Catalogue runtime name of the installed TensorFlow, e.g. ``tensorflow_2.21.0-cpu-py_3.11-x86_64``."""
    try:
        version = metadata.version("tensorflow-cpu")
    except metadata.PackageNotFoundError:
        # a plain ``tensorflow`` wheel installs the same module under another distribution name
        version = metadata.version("tensorflow")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"tensorflow_{version}-cpu-py_{py}-{platform.machine()}"


def build_savedmodel(version_dir: Path) -> Path:
    """Write ``version_dir/saved_model`` and ``config.json``; returns the SavedModel folder."""
    import tensorflow as tf  # imported here so the package imports without TensorFlow

    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    w = mlp_weights()

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            # tf.Variables so the weights are saved as checkpoint values, not folded graph constants
            self.w1 = tf.Variable(w["w1"], name="w1")
            self.b1 = tf.Variable(w["b1"], name="b1")
            self.w2 = tf.Variable(w["w2"], name="w2")
            self.b2 = tf.Variable(w["b2"], name="b2")

        @tf.function(input_signature=[tf.TensorSpec([None, IN], tf.float32, name=INPUT_NAME)])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            h = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
            return {OUTPUT_NAME: tf.matmul(h, self.w2) + self.b2}

    module = MLP()
    out = version_dir / MODEL_FILE
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})
    config = {"engine": "TensorFlow", "runtime": tensorflow_runtime_name(), "model_file": MODEL_FILE}
    (version_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
