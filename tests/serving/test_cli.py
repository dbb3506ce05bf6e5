"""The `enginehouse` command line, run as a user would: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.mlp_weights import mlp_reference


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`enginehouse ARGS` through the installed entry point's module."""
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("model", ["mlp-onnx", "mlp-torchscript"])
def test_predict_prints_an_oip_response(example_models: Path, tmp_path: Path, model: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    inp = tmp_path / "in.json"
    inp.write_text(
        json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    )
    proc = run_cli("predict", str(example_models / model / "1.0.0"), "--input", str(inp))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["outputs"][0]
    assert out["name"] == "y" and out["shape"] == [2, 3]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(2, 3), mlp_reference(x), atol=1e-4)
    npy = tmp_path / "in.npy"
    np.save(npy, x)
    proc = run_cli("predict", str(example_models / model / "1.0.0"), "--input", str(npy))
    assert proc.returncode == 0, proc.stderr


def test_predict_bad_input_names_the_tensor(example_models: Path, tmp_path: Path) -> None:
    inp = tmp_path / "bad.json"
    inp.write_text(
        json.dumps({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]})
    )
    proc = run_cli("predict", str(example_models / "mlp-onnx" / "1.0.0"), "--input", str(inp))
    assert proc.returncode == 2
    assert "EH.0103" in proc.stderr and "'x'" in proc.stderr and "[-1, 4]" in proc.stderr


def test_predict_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    inp = tmp_path / "in.json"
    inp.write_text("{}")
    proc = run_cli("predict", str(tmp_path / "nowhere"), "--input", str(inp))
    assert proc.returncode == 2 and "config.json not found" in proc.stderr


def test_runtimes_json_has_the_reference_shape() -> None:
    proc = run_cli("runtimes", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"count", "total_count", "engine_runtimes"}
    engines = {e["ai_engine"] for e in doc["engine_runtimes"]}
    assert {"PyTorch", "TensorFlow", "ONNX", "MindSpore", "Custom"} <= engines


def test_up_refuses_a_public_bind_without_tokens(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ENGINEHOUSE_AUTH_TOKENS": "", "ENGINEHOUSE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "up", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0 and "refusing to listen on 0.0.0.0" in proc.stderr
    assert not list(tmp_path.glob("ray*")), "refused before Ray started"


def test_template_create_list_show_delete(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "ENGINEHOUSE_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "serving.cli", "template", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    spec = tmp_path / "t.yaml"
    spec.write_text(
        "name: greeter\nstartCommand: python server.py --port {port}\n"
        "yaml: |\n  parameters:\n    GREETING: {type: string, default: hi}\n"
    )
    made = cli("create", "--file", str(spec))
    assert made.returncode == 0, made.stderr
    uuid = made.stdout.strip()
    listed = cli("list").stdout.splitlines()
    assert [line.split()[1] for line in listed] == [
        "python-http-server",
        "fastapi-app",
        "container-http-server",
        "greeter",
    ]
    shown = json.loads(cli("show", "greeter").stdout)
    assert shown["uuid"] == uuid and shown["startCommand"] == "python server.py --port '{port}'"
    assert cli("create", "--file", str(spec)).returncode == 2  # the name is taken
    spec.write_text("name: bad\nstartCommand: []\n")
    refused = cli("create", "--file", str(spec))
    assert refused.returncode == 2 and "startCommand is empty" in refused.stderr
    refused = cli("delete", "fastapi-app")
    assert refused.returncode == 2 and "not found" in refused.stderr  # by uuid only, and system ones stay
    assert cli("delete", uuid).returncode == 0
    assert "greeter" not in cli("list").stdout
