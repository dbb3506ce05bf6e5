"""ONNX engine: runs ``.onnx`` files with onnxruntime on the CPU, or CUDA/TensorRT when placed on a GPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort  # imported only here, so the other engines never need onnxruntime

from runtimes.base import ModelAdapter, Signature, TensorSpec
from runtimes.errors import InvalidInputError, ModelLoadError

#: onnxruntime's type strings -> OIP datatypes
ONNX_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def oip_from_onnx(type_str: str) -> str:
    """The OIP datatype of an onnxruntime type string, e.g. ``tensor(float)`` -> ``FP32``."""
    try:
        return ONNX_TO_OIP[type_str]
    except KeyError:
        raise ValueError(f"ONNX type {type_str} has no Open Inference Protocol datatype") from None


def _dims(shape: list[Any]) -> tuple[int, ...]:
    # onnxruntime reports a symbolic dim as a str ('batch') and an unknown one as None: both are dynamic
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _spec(arg: Any) -> TensorSpec:
    return TensorSpec(arg.name, oip_from_onnx(arg.type), _dims(arg.shape))


def _to_ort(model: str, name: str, arr: np.ndarray) -> np.ndarray:
    """BYTES elements (``bytes``) as the ``str`` objects onnxruntime's string tensors take (str() would
    turn b"hi" into "b'hi'")."""
    try:
        return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[object])(arr)
    except UnicodeDecodeError:
        raise InvalidInputError(model, "ONNX string tensors hold UTF-8 text; this element is not UTF-8", name) from None


def _from_ort(arr: np.ndarray) -> np.ndarray:
    """String outputs back as BYTES elements (UTF-8)."""
    if arr.dtype != object:
        return arr
    return np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(arr)


class OnnxAdapter(ModelAdapter):
    """Serves an ONNX model through an onnxruntime InferenceSession."""

    engine = "ONNX"
    extra = "onnx"
    default_file = "model.onnx"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session: ort.InferenceSession | None = None
        self._output_names: list[str] = []

    def providers(self) -> list[Any]:
        """Execution providers for this placement, best first, limited to those onnxruntime has."""
        available = set(ort.get_available_providers())
        chosen: list[Any] = []
        if self.placement.uses_gpu:
            device_id = int(self.placement.device.partition(":")[2] or 0)
            opts = {"device_id": str(device_id)}
            for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
                if name in available:
                    chosen.append((name, opts))
        # the CPU provider stays last so nodes a GPU provider cannot run still have a home
        chosen.append("CPUExecutionProvider")
        return chosen

    def _open(self, path: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        # the replica's CPU budget: one intra-op pool sized to it, no second pool competing for cores
        opts.intra_op_num_threads = self.placement.cpu_threads
        opts.inter_op_num_threads = 1
        # a serving engine idles between requests: spinning pool threads burned 0.4 core each here while the
        # threads doing the work used 0.03 (benchmarks/README.md); block instead
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(path, sess_options=opts, providers=self.providers())

    async def load(self) -> Signature:
        """Open an InferenceSession and read the signature from the graph's inputs and outputs."""
        path = self.require_file()
        try:
            session = await self.run_blocking(self._open, str(path))
            signature = Signature(
                tuple(_spec(a) for a in session.get_inputs()),
                tuple(_spec(a) for a in session.get_outputs()),
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelLoadError(self.name, f"{path} is not a loadable ONNX model: {exc}") from exc
        self.session = session
        self._output_names = [t.name for t in signature.outputs]
        self.signature = signature
        self.ready = True
        return signature

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.session is not None
        # onnxruntime wants contiguous arrays; ascontiguousarray is a no-op for arrays that already are
        feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        results = self.session.run(self._output_names, feeds)
        return {name: _from_ort(np.asarray(r)) for name, r in zip(self._output_names, results, strict=True)}

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on the engine thread; returns every output by name."""
        for name, arr in inputs.items():
            if arr.dtype == object:
                inputs = dict(inputs, **{name: _to_ort(self.name, name, arr)})
        return await self.run_blocking(self._run, inputs)

    async def unload(self) -> None:
        """Drop the session so onnxruntime frees its arenas, then stop the engine thread."""
        self.session = None
        await super().unload()
