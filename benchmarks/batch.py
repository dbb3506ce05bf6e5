#!/usr/bin/env python3
"""Batch-job benchmark: the engine in-process vs a batch job (serving.batch) over a folder of small inputs.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/batch.py                          # 10,000 inputs for the example ONNX MLP
    .venv/bin/python benchmarks/batch.py --inputs 2000 --instances 2
    .venv/bin/python benchmarks/batch.py --model path/to/model/1.0.0 --max-batch-size 64

What it does, in a temporary folder (``--keep`` keeps it):

1. the model: the example ONNX MLP (``models/build.py``, input ``x`` FP32 [-1, 4]) built there, or ``--model``;
2. the inputs: ``--inputs`` files, each one row of random data without the batch dimension: ``.npy`` for a
   one-input model, ``.npz`` (named) otherwise; dynamic non-batch dimensions get ``--dim``;
3. engine in-process: ``--instances`` threads, each with its own adapter from ``load_model`` (the same
   ``cpu_threads`` as a batch instance), calling ``infer`` back to back on ``max_batch_size``-row batches for
   ``--duration`` seconds: rows/s. No decoding, no files: the engine's limit;
4. the batch job: a local Ray (``--ray-cpus``, default the machine's cores), then ``run_job`` over the folder with
   ``--instances`` actors of ``--num-cpus`` each. Reported end to end (start-up included: model probe, actor
   start, model load) and steady (from the first result written to the last).

The table gives inputs/s (rows/s for the engine) and each row's ratio to the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from runtimes.base import Placement, Signature, read_model_config  # noqa: E402
from runtimes.datatypes import OIP_TO_NUMPY  # noqa: E402
from runtimes.registry import load_model  # noqa: E402


def signature_of(model_dir: Path, cpu_threads: int) -> Signature:
    async def run() -> Signature:
        adapter = await load_model(model_dir, placement=Placement(cpu_threads=cpu_threads))
        try:
            assert adapter.signature is not None
            return adapter.signature
        finally:
            await adapter.unload()

    return asyncio.run(run())


def one_row(signature: Signature, rng: np.random.Generator, dim: int) -> dict[str, np.ndarray]:
    """Random data for every input, one row, without the batch dimension."""
    out: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.datatype == "BYTES":
            raise SystemExit(f"input {spec.name} is BYTES: this benchmark generates numeric inputs only")
        shape = tuple(dim if d == -1 else d for d in spec.shape[1:])
        dtype = OIP_TO_NUMPY[spec.datatype]
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 100, shape).astype(dtype)
    return out


def write_inputs(folder: Path, signature: Signature, n: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    per_dir = 1000  # a few folders rather than one huge one
    for i in range(n):
        sub = folder / f"part{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        row = one_row(signature, rng, dim)
        if len(row) == 1:
            np.save(sub / f"in{i:06d}.npy", next(iter(row.values())))
        else:
            np.savez(sub / f"in{i:06d}.npz", **row)  # type: ignore[arg-type]  # numpy's stub: **kwds vs allow_pickle


def engine_rows_per_s(
    model_dir: Path, signature: Signature, batch: int, instances: int, cpu_threads: int, duration: float, dim: int
) -> float:
    """Rows/s of ``instances`` adapters in threads, each inferring ``batch``-row batches back to back."""
    rng = np.random.default_rng(1)
    rows = [one_row(signature, rng, dim) for _ in range(batch)]
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    counts = [0] * instances
    barrier = threading.Barrier(instances + 1)
    stop = threading.Event()

    def work(i: int) -> None:
        loop = asyncio.new_event_loop()
        adapter = loop.run_until_complete(load_model(model_dir, placement=Placement(cpu_threads=cpu_threads)))
        for _ in range(20):  # warm-up
            loop.run_until_complete(adapter.infer(stacked))
        barrier.wait()
        while not stop.is_set():
            loop.run_until_complete(adapter.infer(stacked))
            counts[i] += batch
        loop.run_until_complete(adapter.unload())
        loop.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(instances)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(duration)
    stop.set()
    elapsed = time.perf_counter() - started
    for t in threads:
        t.join()
    return sum(counts) / elapsed


def run_batch_job(args: argparse.Namespace, model_dir: Path, src: Path, dest: Path) -> dict[str, float]:
    import ray

    from serving.batch import BatchSpec, run_job

    ray_cpus = args.ray_cpus or max(os.cpu_count() or 1, math.ceil(args.instances * args.num_cpus))
    ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        marks: list[tuple[float, int]] = []
        started = time.perf_counter()
        summary = run_job(
            BatchSpec(
                "bench",
                str(model_dir),
                str(src),
                str(dest),
                instance_count=args.instances,
                num_cpus=args.num_cpus,
                max_batch_size=args.max_batch_size,
            ),
            on_progress=lambda s: marks.append((time.perf_counter() - started, s.processed)),
        )
    finally:
        ray.shutdown()
    if summary.failed:
        raise SystemExit(f"{summary.failed} inputs FAILED: see {summary.manifest}")
    first = next((m for m in marks if m[1] > 0), None)
    last = marks[-1]
    steady = (last[1] - first[1]) / (last[0] - first[0]) if first and last[0] > first[0] else float("nan")
    return {
        "inputs": summary.processed,
        "elapsed_s": summary.elapsed_s,
        "first_result_s": first[0] if first else float("nan"),
        "end_to_end": summary.inputs_per_s,
        "steady": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000, help="input files to generate (default 10000)")
    parser.add_argument("--instances", type=int, default=1, help="batch actors, and engine threads (default 1)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per instance (default 1)")
    parser.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: the machine's cores)")
    parser.add_argument("--model", type=Path, help="a model version folder (default: the example ONNX MLP)")
    parser.add_argument("--max-batch-size", type=int, help="rows per engine call (default: the model's config)")
    parser.add_argument("--dim", type=int, default=1, help="size given to dynamic non-batch dimensions (default 1)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the engine measurement (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="enginehouse-batch-bench-"))
    try:
        if args.model is None:
            from models.build import build_onnx

            model_dir = tmp / "models" / "mlp-onnx" / "1.0.0"
            build_onnx(model_dir)
        else:
            model_dir = args.model.resolve()
        batch = args.max_batch_size or read_model_config(model_dir).max_batch_size
        cpu_threads = max(1, round(args.num_cpus))
        signature = signature_of(model_dir, cpu_threads)
        src, dest = tmp / "inputs", tmp / "results"
        t = time.perf_counter()
        write_inputs(src, signature, args.inputs, args.dim)
        print(f"{args.inputs:,} inputs written in {time.perf_counter() - t:.1f} s under {src}", flush=True)
        print(
            f"engine in-process: {args.instances} thread(s), batches of {batch} rows, {args.duration:g} s", flush=True
        )
        engine = engine_rows_per_s(model_dir, signature, batch, args.instances, cpu_threads, args.duration, args.dim)
        print(f"batch job: {args.instances} instance(s) x {args.num_cpus:g} CPU", flush=True)
        job = run_batch_job(args, model_dir, src, dest)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("engine in-process (rows/s)", engine, ""),
        ("batch job, end to end", job["end_to_end"], f"{job['inputs']:,} inputs in {job['elapsed_s']:.1f} s"),
        ("batch job, steady", job["steady"], f"first result after {job['first_result_s']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"model {model_dir.name if args.model else 'mlp-onnx'}, max_batch_size {batch}, instances {args.instances}")
    print(f"{'':<{width}}  {'inputs/s':>10}  {'vs engine':>9}  note")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>10,.0f}  {value / engine:>9.1%}  {note}")
    if args.json:
        args.json.write_text(
            json.dumps({"engine_rows_per_s": engine, **job, "instances": args.instances, "max_batch_size": batch})
        )


if __name__ == "__main__":
    main()
