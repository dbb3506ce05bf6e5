"""The example MLP's weights: deterministic, from a fixed seed, shared by every exporter.

Architecture: input ``x`` FP32 [-1, 4] -> Dense(16) + ReLU -> Dense(3) -> output ``y`` FP32 [-1, 3].
The same weights exported to ONNX, TorchScript, SavedModel and MindIR must agree to 1e-4.
"""

from __future__ import annotations

import numpy as np

IN, HIDDEN, OUT = 4, 16, 3
INPUT_NAME, OUTPUT_NAME = "x", "y"


def mlp_weights(seed: int = 20261122) -> dict[str, np.ndarray]:
    """w1 [IN, HIDDEN], b1 [HIDDEN], w2 [HIDDEN, OUT], b2 [OUT], all float32."""
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((IN, HIDDEN)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((HIDDEN, OUT)).astype(np.float32) * 0.5,
        "b2": rng.standard_normal(OUT).astype(np.float32) * 0.1,
    }


def mlp_reference(x: np.ndarray, w: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The MLP in plain numpy: what every export must reproduce."""
    w = w or mlp_weights()
    h = np.maximum(x @ w["w1"] + w["b1"], 0.0)
    return (h @ w["w2"] + w["b2"]).astype(np.float32)
