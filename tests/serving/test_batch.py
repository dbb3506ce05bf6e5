"""Batch jobs (serving.batch): every mapping, planted bad inputs, resume after a stop or a killed runner, the
path checks and the CLI; every successful result is compared with the engine called directly."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtimes.base import Signature, TensorSpec
from runtimes.registry import load_model
from serving.batch import BatchJobError, BatchSpec, BatchSpecError, PathError, check_paths, manifest_path, run_job
from serving.batch.inputs import (
    InputError,
    cast_cells,
    csv_inputs,
    decode_file,
    parse_rule,
    tensors_from_values,
)
from serving.batch.manifest import Manifest
from serving.batch.worker import format_ranges, parse_ranges

MLP_SIG = Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))
TEXT_SIG = Signature((TensorSpec("text", "BYTES", (-1,)),), (TensorSpec("echo", "BYTES", (-1,)),))


# -- helpers -------------------------------------------------------------------------------------------------------
class Engine:
    """The model's adapter loaded in this process: the reference every batch result is compared with."""

    def __init__(self, model_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.adapter = self.loop.run_until_complete(load_model(model_dir))

    def __call__(self, **tensors: np.ndarray) -> dict[str, np.ndarray]:
        return self.loop.run_until_complete(self.adapter.infer(tensors))

    def close(self) -> None:
        self.loop.run_until_complete(self.adapter.unload())
        self.loop.close()


def read_manifest(dest: Path, service_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest_path(dest, service_id).read_text().splitlines()]


def by_source(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    counts = Counter(line["source"] for line in lines)
    repeated = [s for s, n in counts.items() if n > 1]
    assert not repeated, f"sources listed more than once: {repeated[:5]}"
    return {line["source"]: line for line in lines}


def output(doc: dict[str, Any], name: str | None = None) -> np.ndarray:
    """The (first or named) output of an OIP v2 response, shaped; or the predictions of an instances one."""
    if "predictions" in doc:
        return np.asarray(doc["predictions"])
    out = next(o for o in doc["outputs"] if name is None or o["name"] == name)
    if out["datatype"] == "BYTES":
        return np.asarray(out["data"], dtype=object).reshape(out["shape"])
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def oip(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": list(arr.shape), "data": arr.ravel().tolist()}]}


def wait_for(predicate: Any, timeout: float = 60.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_dir(example_models: Path) -> Path:
    return example_models / "mlp-onnx" / "1.0.0"


@pytest.fixture(scope="module")
def mlp(mlp_dir: Path) -> Iterator[Engine]:
    engine = Engine(mlp_dir)
    yield engine
    engine.close()


def _save_onnx(folder: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> Path:
    import onnx
    from onnx import helper

    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(
        helper.make_graph(nodes, folder.parent.name, inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "config.json").write_text(json.dumps({"engine": "ONNX", "model_file": "model.onnx"}))
    return folder


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model whose one input is BYTES [-1]: the output echoes it."""
    from onnx import TensorProto, helper

    return _save_onnx(
        tmp_path_factory.mktemp("models") / "echo-text" / "1.0.0",
        [helper.make_node("Identity", ["text"], ["echo"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"])],
    )


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model taking UINT8 images [-1, 8, 8, 3] and giving each channel's mean [-1, 3]."""
    from onnx import TensorProto, helper

    return _save_onnx(
        tmp_path_factory.mktemp("models") / "channel-mean" / "1.0.0",
        [
            helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1, 2], keepdims=0),
        ],
        [helper.make_tensor_value_info("img", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 3])],
    )


# -- the file mapping ----------------------------------------------------------------------------------------------
def test_file_mapping_every_format_against_the_engine(
    serve_instance: str, mlp_dir: Path, mlp: Engine, tmp_path: Path
) -> None:
    src, dest = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(1)
    expected: dict[str, np.ndarray] = {}  # source -> the engine's output for it
    for i in range(150):  # one row each, without the batch dimension
        x = rng.standard_normal(4).astype(np.float32)
        rel = f"npy/{i // 50}/row{i}.npy"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(src / rel, x)
        expected[rel] = mlp(x=x[None])["y"]
    for i in range(20):  # a batch of 1-3 rows in one file
        x = rng.standard_normal((1 + i % 3, 4)).astype(np.float32)
        np.save(src / f"npy/batch{i}.npy", x)
        expected[f"npy/batch{i}.npy"] = mlp(x=x)["y"]
    (src / "npz").mkdir()
    for i in range(40):
        x = rng.standard_normal(4 if i % 2 else (2, 4)).astype(np.float32)
        np.savez(src / f"npz/n{i}.npz", x=x)
        expected[f"npz/n{i}.npz"] = mlp(x=x.reshape(-1, 4))["y"]
    (src / "json").mkdir()
    for i in range(40):
        x = rng.standard_normal((1 + i % 2, 4)).astype(np.float32)
        (src / f"json/oip{i}.json").write_text(json.dumps(oip("x", x)))
        expected[f"json/oip{i}.json"] = mlp(x=x)["y"]
    for i in range(30):
        x = rng.standard_normal((2, 4)).astype(np.float32)
        (src / f"json/inst{i}.json").write_text(json.dumps({"instances": x.tolist()}))
        expected[f"json/inst{i}.json"] = mlp(x=x)["y"]
    bad = {
        "bad/corrupt.npy": "NumPy magic",
        "bad/truncated.npy": "not a readable .npy",
        "bad/wide.npy": "shape [1, 5] given, [-1, 4] expected",
        "bad/float64.npy": "datatype FP64 given, FP32 expected",
        "bad/wrong-name.npz": "unknown input(s) ['z']",
        "bad/broken.json": "not valid JSON",
        "bad/short.json": "3 elements given, shape [1, 4] needs 4",
        "bad/notes.txt": "a .txt file is one BYTES element; input 'x' is FP32",
        "bad/picture.png": "not an image shape",
        "bad/data.xyz": "unsupported file type '.xyz'",
    }
    (src / "bad").mkdir()
    (src / "bad/corrupt.npy").write_bytes(b"definitely not numpy")
    buf = io.BytesIO()
    np.save(buf, np.zeros((64, 4), np.float32))
    (src / "bad/truncated.npy").write_bytes(buf.getvalue()[:200])
    np.save(src / "bad/wide.npy", np.zeros(5, np.float32))
    np.save(src / "bad/float64.npy", np.zeros(4))
    np.savez(src / "bad/wrong-name.npz", z=np.zeros(4, np.float32))
    (src / "bad/broken.json").write_text('{"inputs": [')
    (src / "bad/short.json").write_text(
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]})
    )
    (src / "bad/notes.txt").write_text("hello")
    (src / "bad/picture.png").write_bytes(b"\x89PNG not really")
    (src / "bad/data.xyz").write_text("?")
    (src / ".hidden.npy").write_bytes(b"left out")

    progress: list[tuple[int, int, int, int]] = []
    summary = run_job(
        BatchSpec("svc-file", str(mlp_dir), str(src), str(dest), max_batch_size=8),
        on_progress=lambda s: progress.append((s.total, s.succeeded, s.failed, s.progress)),
    )
    assert (summary.total, summary.succeeded, summary.failed) == (len(expected) + len(bad), len(expected), len(bad))
    assert summary.processed == summary.total and summary.progress == 100 and not summary.stopped
    assert progress[0][:3] == (summary.total, 0, 0) and progress[-1][3] == 100
    assert [p[1] + p[2] for p in progress] == sorted(p[1] + p[2] for p in progress)  # never goes back

    lines = by_source(read_manifest(dest, "svc-file"))
    assert set(lines) == set(expected) | set(bad)
    for rel, reason in bad.items():
        assert lines[rel]["result"] == "FAILED" and reason in lines[rel]["error_message"], lines[rel]
    for rel, want in expected.items():
        line = lines[rel]
        assert line["result"] == "SUCCESSFUL", line
        assert line["inference-loc"] == str(dest / f"{rel}.json")
        doc = json.loads(Path(line["inference-loc"]).read_text())
        if "predictions" not in doc:
            assert doc["model_name"] == "mlp-onnx" and doc["model_version"] == "1.0.0"
        assert np.allclose(output(doc), want, atol=1e-5), rel
    # a .npy without the batch dimension is one row, with it a batch
    assert output(json.loads((dest / "npy/0/row0.npy.json").read_text())).shape == (1, 3)
    assert output(json.loads((dest / "npy/batch2.npy.json").read_text())).shape == (3, 3)
    assert not list(dest.rglob("*.tmp"))


def test_text_and_image_inputs(serve_instance: str, text_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "text"
    src.mkdir()
    echo = Engine(text_dir)
    texts = {f"t{i}.txt": f"line {i}: ünïcode ✓\nsecond line" for i in range(12)}
    expected: dict[str, np.ndarray] = {}
    for rel, body in texts.items():
        (src / rel).write_text(body, encoding="utf-8")
        expected[rel] = echo(text=np.array([body.encode()], dtype=object))["echo"]
    echo.close()
    (src / "latin1.txt").write_bytes(b"caf\xe9")  # onnxruntime's strings are UTF-8: this one fails
    summary = run_job(BatchSpec("svc-text", str(text_dir), str(src), str(tmp_path / "text-out")))
    assert (summary.succeeded, summary.failed) == (12, 1)
    lines = by_source(read_manifest(tmp_path / "text-out", "svc-text"))
    assert "UTF-8" in lines["latin1.txt"]["error_message"]
    for rel, body in texts.items():
        got = output(json.loads(Path(lines[rel]["inference-loc"]).read_text()))
        assert got.tolist() == [v.decode() for v in expected[rel]] == [body]

    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(2)
    mean = Engine(image_dir)
    expected = {}
    for i, ext in enumerate(["png", "bmp", "jpg", "jpeg"] * 5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"img{i}.{ext}")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(src / "gray.png")  # mode L, converted to RGB
    for path in src.iterdir():
        # the reference decodes the file with Pillow too (JPEG is lossy) and calls the engine
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
        expected[path.name] = mean(img=pixels[None])["mean"]
    mean.close()
    assert np.allclose(expected["gray.png"], 200.0)
    Image.fromarray(np.zeros((10, 8, 3), np.uint8)).save(src / "tall.png")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    summary = run_job(BatchSpec("svc-img", str(image_dir), str(src), str(tmp_path / "img-out")))
    assert (summary.succeeded, summary.failed) == (len(expected), 2)
    lines = by_source(read_manifest(tmp_path / "img-out", "svc-img"))
    assert "image is 10x8 (HxW); input 'img' takes 8x8" in lines["tall.png"]["error_message"]
    assert "not a readable image" in lines["corrupt.jpg"]["error_message"]
    for rel, want in expected.items():
        doc = json.loads(Path(lines[rel]["inference-loc"]).read_text())
        assert np.allclose(output(doc), want, atol=1e-5), rel


# -- the csv mapping -----------------------------------------------------------------------------------------------
def test_csv_mapping_against_the_engine(serve_instance: str, mlp_dir: Path, mlp: Engine, tmp_path: Path) -> None:
    src, dest = tmp_path / "in", tmp_path / "out"
    (src / "more").mkdir(parents=True)
    rng = np.random.default_rng(3)
    expected: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    # a.csv: the columns in another order than the input's, plus one the model does not use
    rows_a = ["id,d,c,b,a"]

    def add(text: str) -> str:
        rows_a.append(text)
        return f"a.csv#{len(rows_a) - 1}"  # the 1-based record number after the header

    for i in range(1, 161):
        if i == 10:
            failed[add("10,1.0,2.0")] = "column 'a' (input 'x') is missing: the record has 3 columns"
        elif i == 20:
            failed[add("20,1.0,abc,3.0,4.0")] = "input 'x' is FP32: value 'abc' is not one"
        elif i == 30:  # a field over csv's size limit: bad framing, and reading goes on
            failed[add('30,"' + "9" * 140_000 + '",1,2,3')] = "malformed CSV record"
        elif i == 40:
            add("")  # a blank line: not an input, but it keeps its number
        else:
            x = rng.standard_normal(4).astype(np.float32)
            expected[add(f"{i}," + ",".join(repr(float(v)) for v in x[::-1]))] = mlp(x=x[None])["y"]
    (src / "a.csv").write_text("\n".join(rows_a) + "\n")
    rows_b = ["a,b,c,d,id"]
    for i in range(1, 101):
        x = rng.standard_normal(4).astype(np.float32)
        rows_b.append(",".join(repr(float(v)) for v in x) + f",{i}")
        expected[f"more/b.csv#{i}"] = mlp(x=x[None])["y"]
    (src / "more/b.csv").write_text("\r\n".join(rows_b) + "\r\n")
    (src / "more/c.csv").write_text("a,b,id\n1,2,3\n")  # no column c or d: every row fails
    failed["more/c.csv#1"] = "column 'c' (input 'x') is not in the CSV header"
    (src / "notes.txt").write_text("not a csv: ignored")

    rule = {"inputs": {"x": ["a", "b", "c", "d"]}}
    summary = run_job(
        BatchSpec(
            "svc-csv", str(mlp_dir), str(src), str(dest), mapping_type="csv", mapping_rule=rule, max_batch_size=16
        )
    )
    assert (summary.total, summary.succeeded, summary.failed) == (
        len(expected) + len(failed),
        len(expected),
        len(failed),
    )
    lines = by_source(read_manifest(dest, "svc-csv"))
    assert set(lines) == set(expected) | set(failed)
    for source, reason in failed.items():
        assert lines[source]["result"] == "FAILED" and reason in lines[source]["error_message"], lines[source]
    for source, want in expected.items():
        rel, _, row = source.rpartition("#")
        assert lines[source]["inference-loc"] == str(dest / rel / f"{row}.json")
        doc = json.loads((dest / rel / f"{row}.json").read_text())
        assert np.allclose(output(doc), want, atol=1e-5), source


# -- resume: exactly once --------------------------------------------------------------------------------------------
def _npy_folder(src: Path, n: int, mlp: Engine) -> dict[str, np.ndarray]:
    src.mkdir(parents=True)
    rng = np.random.default_rng(4)
    expected = {}
    for i in range(n):
        x = rng.standard_normal(4).astype(np.float32)
        np.save(src / f"x{i:04d}.npy", x)
        expected[f"x{i:04d}.npy"] = mlp(x=x[None])["y"]
    return expected


def _check_all(dest: Path, service_id: str, expected: dict[str, np.ndarray]) -> None:
    lines = by_source(read_manifest(dest, service_id))
    assert set(lines) == set(expected)
    for source, want in expected.items():
        assert lines[source]["result"] == "SUCCESSFUL"
        assert np.allclose(output(json.loads(Path(lines[source]["inference-loc"]).read_text())), want, atol=1e-5)


def test_stop_then_resume_lists_every_input_once(
    serve_instance: str, mlp_dir: Path, mlp: Engine, tmp_path: Path
) -> None:
    import threading

    src, dest = tmp_path / "in", tmp_path / "out"
    expected = _npy_folder(src, 400, mlp)
    spec = BatchSpec("svc-resume", str(mlp_dir), str(src), str(dest), max_batch_size=4)
    stop = threading.Event()

    def halfway(s: Any) -> None:
        if s.succeeded >= 100:
            stop.set()

    first = run_job(spec, on_progress=halfway, stop=stop)
    assert first.stopped and 100 <= first.succeeded < 400
    written = len(read_manifest(dest, "svc-resume"))
    assert written == first.succeeded
    # a crash in the middle of a line: the next run cuts it off
    with manifest_path(dest, "svc-resume").open("ab") as f:
        f.write(b'{"source": "x0399.npy", "resu')
    progress: list[int] = []
    second = run_job(spec, on_progress=lambda s: progress.append(s.progress))
    assert not second.stopped and second.skipped == written and second.processed == 400 - written
    assert (second.total, second.succeeded, second.failed) == (400, 400, 0)
    assert progress[0] == written * 100 // 400 and progress[-1] == 100
    _check_all(dest, "svc-resume", expected)
    third = run_job(spec)  # nothing left: only counts
    assert (third.skipped, third.processed, third.succeeded) == (400, 0, 400)


def test_runner_actor_stopped_killed_then_resumed(
    serve_instance: str, mlp_dir: Path, mlp: Engine, tmp_path: Path
) -> None:
    import ray

    from serving.batch.runner import BatchRunner

    src, dest = tmp_path / "in", tmp_path / "out"
    expected = _npy_folder(src, 1000, mlp)
    spec = BatchSpec("svc-kill", str(mlp_dir), str(src), str(dest), max_batch_size=2).as_dict()

    def progress() -> dict[str, Any]:
        return dict(ray.get(runner.progress.remote()))

    runner = BatchRunner.remote()  # type: ignore[attr-defined]
    assert progress()["state"] == "idle"
    started = ray.get(runner.start.remote(spec))
    assert started["state"] == "running" and started["started_at"] > 0
    wait_for(lambda: progress()["succeeded"] > 0)
    ray.get(runner.stop.remote())
    stopped = wait_for(lambda: (p := progress())["state"] != "running" and p)
    assert stopped["state"] == "stopped" and 0 < stopped["progress"] < 100 and stopped["finished_at"] > 0
    assert len(read_manifest(dest, "svc-kill")) == stopped["succeeded"]

    # the same actor starts the job again (it resumes), and is killed in the middle of it
    ray.get(runner.start.remote(spec))
    snap = wait_for(lambda: (p := progress())["succeeded"] > stopped["succeeded"] and p)
    ray.kill(runner)
    assert snap["state"] == "running" and snap["total"] == 1000
    time.sleep(0.5)
    killed_at = len(read_manifest(dest, "svc-kill"))
    assert killed_at < 1000, "the job ended before the kill: make it longer"

    runner = BatchRunner.remote()  # type: ignore[attr-defined]
    ray.get(runner.start.remote(spec))
    done = wait_for(lambda: (p := ray.get(runner.progress.remote()))["state"] != "running" and p, every=0.2)
    assert done["state"] == "finished", done
    assert (done["total"], done["succeeded"], done["failed"], done["progress"]) == (1000, 1000, 0, 100)
    assert done["finished_at"] >= done["started_at"] and done["error"] is None
    _check_all(dest, "svc-kill", expected)
    # stop() on an ended job changes nothing; a bad spec is refused by start() itself
    assert ray.get(runner.stop.remote())["state"] == "finished"
    with pytest.raises(ValueError, match="dest_path"):
        ray.get(runner.start.remote({**spec, "dest_path": str(src / "out")}))
    ray.kill(runner)


# -- refusals ------------------------------------------------------------------------------------------------------
def test_check_paths_refuses_bad_paths(tmp_path: Path, mlp_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(src)

    def refused(field: str, src_path: Path | str, dest_path: Path | str, match: str) -> None:
        with pytest.raises(PathError, match=match) as info:
            check_paths(BatchSpec("s", str(mlp_dir), str(src_path), str(dest_path)))
        assert info.value.field == field and str(info.value).startswith(field)

    refused("src_path", tmp_path / "nowhere", tmp_path / "out", "does not exist")
    refused("src_path", tmp_path / "file", tmp_path / "out", "not a folder")
    refused("dest_path", src, src, "same folder")
    refused("dest_path", src, src / "out", "inside src_path")
    refused("dest_path", src, tmp_path / "link" / "deeper", "inside src_path")  # through a symlink
    refused("dest_path", tmp_path / "link", src / "x", "inside src_path")
    refused("dest_path", src, tmp_path / "file", "not a folder")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o000)
        try:
            refused("src_path", locked, tmp_path / "out", "not readable")
        finally:
            locked.chmod(0o755)
    assert check_paths(BatchSpec("s", str(mlp_dir), str(src), str(tmp_path / "new" / "out"))) == (
        src.resolve(),
        (tmp_path / "new" / "out").resolve(),
    )
    with pytest.raises(PathError, match="src_path: is required"):
        BatchSpec("s", str(mlp_dir), "", str(tmp_path))
    for field, kwargs in (
        ("mapping_type", {"mapping_type": "xml"}),
        ("instance_count", {"instance_count": 0}),
        ("num_cpus", {"num_cpus": -1}),
        ("max_batch_size", {"max_batch_size": 0}),
        ("service_id", {"service_id": "../x"}),
    ):
        with pytest.raises(BatchSpecError) as err:
            BatchSpec.from_dict({"service_id": "s", "model_dir": "m", "src_path": "a", "dest_path": "b", **kwargs})
        assert err.value.field == field
    with pytest.raises(BatchSpecError, match="unknown field"):
        BatchSpec.from_dict({"service_id": "s", "model_dir": "m", "src_path": "a", "dest_path": "b", "bogus": 1})


def test_unusable_model_or_rule_fails_the_job(serve_instance: str, mlp_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", np.zeros(4, np.float32))
    broken = tmp_path / "broken" / "1.0.0"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"engine": "ONNX", "model_file": "model.onnx"}))
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BatchJobError, match="could not be loaded"):
        run_job(BatchSpec("s", str(broken), str(src), str(tmp_path / "o1")))
    with pytest.raises(BatchJobError, match=r"config\.json not found"):
        run_job(BatchSpec("s", str(tmp_path), str(src), str(tmp_path / "o2")))
    with pytest.raises(BatchJobError, match="Custom engine"):
        run_job(BatchSpec("s", str(mlp_dir), str(src), str(tmp_path / "o3"), model_config={"engine": "Custom"}))
    with pytest.raises(BatchSpecError, match="num_gpus: one instance needs 1 GPU") as err:
        run_job(BatchSpec("s", str(mlp_dir), str(src), str(tmp_path / "o4"), num_gpus=1))
    assert err.value.field == "num_gpus"
    with pytest.raises(BatchSpecError, match=r"mapping_rule.*unknown \['z'\]"):
        run_job(
            BatchSpec(
                "s",
                str(mlp_dir),
                str(src),
                str(tmp_path / "o5"),
                mapping_type="csv",
                mapping_rule={"inputs": {"z": [0]}},
            )
        )


# -- the command line ----------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    from serving.batch.cli import add_parser

    parser = argparse.ArgumentParser(prog="enginehouse")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *argv])
    return int(args.func(args))


def test_cli_runs_a_job_and_refuses_bad_arguments(
    serve_instance: str,
    mlp_dir: Path,
    mlp: Engine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, dest = tmp_path / "in", tmp_path / "out"
    expected = _npy_folder(src, 30, mlp)
    (src / "odd.bin").write_bytes(b"?")
    # the model by its id in the registry
    from serving.registry import open_registry

    home = tmp_path / "home"
    monkeypatch.setenv("ENGINEHOUSE_HOME", str(home))
    registry = open_registry(None, home)
    model_id = registry.add_model(
        "default",
        model_name="mlp",
        model_version="2.0.0",
        model_type="ONNX",
        source_location=str(mlp_dir),
        engine_config={"model_dir": str(mlp_dir), "config": {"engine": "ONNX", "model_file": "model.onnx"}},
    )
    registry.close()
    rc = _cli(["--model", model_id, "--input", str(src), "--output", str(dest), "--service-id", "cli", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["progress"]) == (31, 30, 1, 100)
    assert summary["manifest"] == str(dest / "infer-result-cli.manifest") and summary["inputs_per_s"] > 0
    lines = by_source(read_manifest(dest, "cli"))
    assert lines["odd.bin"]["result"] == "FAILED" and len(lines) == 31
    doc = json.loads(Path(lines["x0000.npy"]["inference-loc"]).read_text())
    assert doc["model_name"] == "mlp" and doc["model_version"] == "2.0.0"
    assert np.allclose(output(doc), expected["x0000.npy"], atol=1e-5)

    # the table form, by folder, resuming: nothing left to do
    assert _cli(["--model", str(mlp_dir), "--input", str(src), "--output", str(dest), "--service-id", "cli"]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "30" in out and "infer-result-cli.manifest" in out

    for argv, message in (
        (["--model", str(mlp_dir), "--input", str(tmp_path / "none"), "--output", str(dest)], "src_path"),
        (["--model", str(mlp_dir), "--input", str(src), "--output", str(src / "o")], "inside src_path"),
        (["--model", "no-such-id", "--input", str(src), "--output", str(dest)], "neither a folder nor a model id"),
        (["--model", str(tmp_path / "nope"), "--input", str(src), "--output", str(dest)], "not a model version"),
        (["--model", str(mlp_dir), "--input", str(src), "--output", str(dest), "--mapping-rule", "{"], "not JSON"),
        (["--model", str(mlp_dir), "--input", str(src), "--output", str(dest), "--instances", "0"], "instance_count"),
    ):
        assert _cli(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


# -- units, without Ray -----------------------------------------------------------------------------------------------
def test_decoders() -> None:
    one = io.BytesIO()
    np.save(one, np.ones(4, np.float32))
    assert decode_file("a.npy", one.getvalue(), MLP_SIG, "m").tensors["x"].shape == (1, 4)
    txt = decode_file("a.txt", b"\xffraw bytes", TEXT_SIG, "m")
    assert txt.tensors["text"].shape == (1,) and txt.tensors["text"][0] == b"\xffraw bytes"
    with pytest.raises(InputError, match="one input"):
        decode_file("a.npy", one.getvalue(), Signature(MLP_SIG.inputs * 2, ()), "m")
    inst = decode_file("a.json", b'{"instances": [[1, 2, 3, 4]]}', MLP_SIG, "m")
    assert inst.meta == {"instances": True} and inst.tensors["x"].dtype == np.float32

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)).save(png, format="PNG")
    nchw = Signature((TensorSpec("img", "UINT8", (-1, 3, -1, -1)),), ())
    arr = decode_file("a.png", png.getvalue(), nchw, "m").tensors["img"]
    assert arr.shape == (1, 3, 2, 3) and arr[0, :, 0, 0].tolist() == [0, 1, 2]
    gray = Signature((TensorSpec("img", "UINT8", (-1, 2, 3)),), ())
    assert decode_file("a.png", png.getvalue(), gray, "m").tensors["img"].shape == (1, 2, 3)
    with pytest.raises(InputError, match="UINT8"):
        decode_file("a.png", png.getvalue(), Signature((TensorSpec("img", "FP32", (-1, 2, 3, 3)),), ()), "m")


def test_csv_rules_and_records(tmp_path: Path) -> None:
    sig = Signature(
        (TensorSpec("a", "INT64", (-1, 2)), TensorSpec("b", "BOOL", (-1,)), TensorSpec("s", "BYTES", (-1,))), ()
    )
    rule = parse_rule({"inputs": {"a": [0, 2], "b": 1, "s": [3]}, "header": False, "delimiter": ";"}, sig)
    path = tmp_path / "d.csv"
    path.write_bytes(b"1;yes;2;caf\xe9\n3;maybe;4;x\n\n5;0;6\n")
    records = list(csv_inputs(path, rule))
    assert [r[0] for r in records] == [1, 2, 4]
    assert records[0][1] == {"a": ["1", "2"], "b": ["yes"], "s": ["caf\udce9"]}
    values = cast_cells(records[0][1] or {}, sig)
    tensors = tensors_from_values(json.loads(json.dumps(values)), sig)
    assert tensors["a"].tolist() == [[1, 2]] and tensors["b"].tolist() == [True] and tensors["s"][0] == b"caf\xe9"
    with pytest.raises(InputError, match="input 'b' is BOOL: value 'maybe'"):
        cast_cells(records[1][1] or {}, sig)
    assert records[2][2] is not None and "column 3 (input 's') is missing" in records[2][2]
    for bad, match in (
        ({"inputs": {"a": ["x"], "b": [1], "s": [2]}, "header": False}, "is a name but header is false"),
        ({"inputs": {"a": [0]}}, r"missing \['b', 's'\]"),
        ({"inputs": {"a": [0], "b": [1], "s": [2]}, "sep": ","}, "unknown key"),
        ({}, "mapping_rule.inputs is required"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_rule(bad, sig)
    with pytest.raises(InputError, match="cannot fill one row"):
        tensors_from_values({"a": [1, 2, 3]}, sig)
    assert parse_rule(None, MLP_SIG).inputs == {"x": ()}  # one input: every column


def test_manifest_truncates_a_partial_line_and_ranges(tmp_path: Path) -> None:
    path = tmp_path / "m.manifest"
    path.write_bytes(b'{"source": "a", "result": "SUCCESSFUL", "inference-loc": "/x"}\n{"source": "b", "res')
    with Manifest(path) as m:
        assert m.done == {"a": "SUCCESSFUL"}
        assert [
            line["source"]
            for line in m.append([{"source": "a", "result": "FAILED"}, {"source": "b\udcff", "result": "FAILED"}])
        ] == ["b\udcff"]
    with Manifest(path) as m:
        assert m.done == {"a": "SUCCESSFUL", "b\udcff": "FAILED"}
    assert path.read_bytes().count(b"\n") == 2
    rows = {0, 1, 2, 3, 7, 9, 10}
    assert (
        format_ranges(rows) == "0-3,7,9-10" and parse_ranges(format_ranges(rows)) == rows and parse_ranges("") == set()
    )
