"""TensorFlow engine: a SavedModel folder served through its ``serving_default`` signature."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from runtimes.base import ModelAdapter, Signature, TensorSpec
from runtimes.errors import ModelLoadError

SIGNATURE_KEY = "serving_default"

# tf.DType.name -> OIP datatype
_TF_TO_OIP = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}


def tf_to_oip(dtype_name: str) -> str:
    """OIP datatype of a TensorFlow dtype name; ValueError for types OIP cannot carry (e.g. complex)."""
    try:
        return _TF_TO_OIP[dtype_name]
    except KeyError:
        raise ValueError(f"TensorFlow dtype {dtype_name} has no Open Inference Protocol datatype") from None


def _spec(name: str, tensor_spec: Any) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in tensor_spec.shape.as_list())
    return TensorSpec(name, tf_to_oip(tensor_spec.dtype.name), shape)


def _configure(tf: Any, cpu_threads: int) -> None:
    """Process-wide TF settings; they only take effect before TF initialises its runtime."""
    # Growth instead of grabbing all GPU memory up front, so several replicas can share one GPU
    for gpu in tf.config.list_physical_devices("GPU"):
        # RuntimeError: TF already initialised in this process, the first setting stays
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpu_threads)
        tf.config.threading.set_inter_op_parallelism_threads(cpu_threads)
    except RuntimeError:
        pass  # same: threads are fixed once TF has initialised (e.g. a second model in one process)


class TensorFlowAdapter(ModelAdapter):
    """Runs a TensorFlow SavedModel folder."""

    engine = "TensorFlow"
    extra = "tensorflow"
    default_file = "saved_model"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._fn: Any = None
        self._device = "/CPU:0"
        self._output_names: tuple[str, ...] = ()

    async def load(self) -> Signature:
        """Load the SavedModel and read its ``serving_default`` signature."""
        path = self.require_file()
        if not path.is_dir():
            raise ModelLoadError(self.name, f"{path} is not a SavedModel folder")
        return await self.run_blocking(self._load, path)

    def _load(self, path: Any) -> Signature:
        import tensorflow as tf  # imported only here so the server starts without TensorFlow

        _configure(tf, max(1, self.placement.cpu_threads))
        if self.placement.uses_gpu:
            index = self.placement.device.partition(":")[2] or "0"
            self._device = f"/GPU:{index}"
        try:
            with tf.device(self._device):
                model = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many types (OSError, NotFoundError, DecodeError, ...)
            raise ModelLoadError(self.name, f"{type(exc).__name__}: {exc}") from None
        signatures = getattr(model, "signatures", {})
        if SIGNATURE_KEY not in signatures:
            raise ModelLoadError(
                self.name, f"SavedModel has no '{SIGNATURE_KEY}' signature; it has {sorted(signatures)}"
            )
        fn = signatures[SIGNATURE_KEY]
        try:
            # signature functions take keyword arguments only, so positional args are always empty
            _, kw_inputs = fn.structured_input_signature
            inputs = tuple(_spec(name, spec) for name, spec in sorted(kw_inputs.items()))
            outputs = tuple(_spec(name, spec) for name, spec in sorted(fn.structured_outputs.items()))
        except ValueError as exc:
            raise ModelLoadError(self.name, str(exc)) from None
        self._model, self._fn = model, fn  # keep the model: the function needs its variables alive
        self._output_names = tuple(t.name for t in outputs)
        self.signature = Signature(inputs, outputs)
        self.ready = True
        return self.signature

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call the serving signature on the engine thread."""
        return await self.run_blocking(self._predict, inputs)

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        with tf.device(self._device):
            feeds = {name: tf.convert_to_tensor(arr) for name, arr in inputs.items()}
            result = self._fn(**feeds)
        return {name: result[name].numpy() for name in self._output_names}

    async def unload(self) -> None:
        """Drop the model so TF can free its variables."""
        self._model = self._fn = None
        await super().unload()
