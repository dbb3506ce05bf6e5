"""A minimal MLServer runtime: the benchmark's ONNX file run with onnxruntime, as MLServer users write one.

Loaded by MLServer from ``model-settings.json`` (``"implementation": "onnx_runtime.OnnxRuntimeModel"``) with
this folder on ``PYTHONPATH``. ``parameters.extra.intra_op_num_threads`` is the engine's thread budget, the
same as an Enginehouse replica's. MLServer's adaptive batching (``max_batch_size``, ``max_batch_time``)
merges requests into one ``InferenceRequest`` before ``predict`` and splits the answer again.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("intra_op_num_threads", 1))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for item in payload.inputs:
            feeds[item.name] = np.ascontiguousarray(NumpyCodec.decode_input(item), dtype=np.float32)
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, r) for name, r in zip(self._outputs, results, strict=True)],
        )
