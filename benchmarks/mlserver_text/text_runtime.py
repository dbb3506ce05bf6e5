"""An MLServer runtime for all-MiniLM-L6-v2: BYTES text in, L2-normalised FP32 sentence embeddings out.

The peer of Enginehouse's text-embedding pipeline (``runtimes/text.py``) in ``benchmarks/text.py``, written as an
MLServer user would write it, self-contained (MLServer's venv does not have the project). It does the same work
on the same files: the ONNX encoder (``model.onnx``, INT64 ``input_ids``/``attention_mask``/``token_type_ids`` in,
``last_hidden_state`` out) run by onnxruntime with the same session options, the ``tokenizers`` tokenizer from
``tokenizer.json`` (padding to the longest text of the batch, truncation at ``max_seq_length``), mean pooling over
the attention mask and L2 normalisation, as sentence-transformers does. The work runs on one thread of the
runtime's own, off MLServer's event loop.

``model-settings.json`` names it (``"implementation": "text_runtime.TextEmbeddingModel"``) with this folder on
``PYTHONPATH``; ``parameters.extra`` carries ``intra_op_num_threads`` (the engine's thread budget) and
``max_seq_length``. MLServer's adaptive batching (``max_batch_size``, ``max_batch_time``) merges requests into one
``InferenceRequest`` (the texts of all of them in one ``text`` input) before ``predict`` and splits the answer.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from tokenizers import Tokenizer

TEXT, EMBEDDING = "text", "embedding"


def _texts(values: object) -> list[str]:
    """The elements of a BYTES input as str (JSON gives str, the binary path bytes)."""
    items = getattr(values, "root", values)
    if isinstance(items, str | bytes):
        items = [items]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items]


class TextEmbeddingModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("intra_op_num_threads", 1))
        opts.inter_op_num_threads = 1
        # the same as an Enginehouse replica: pool threads block between calls instead of spinning
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(uri, sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name
        tok = Tokenizer.from_file(os.path.join(os.path.dirname(uri), "tokenizer.json"))
        pad = tok.padding or {}
        pad_token = pad.get("pad_token", "[PAD]")
        tok.enable_padding(pad_id=pad.get("pad_id", tok.token_to_id(pad_token) or 0), pad_token=pad_token)
        tok.enable_truncation(max_length=int(extra.get("max_seq_length", 256)))
        self._tokenizer = tok
        # the work runs on one thread of its own, so MLServer's event loop keeps reading requests (and filling
        # the next adaptive batch) while a batch is encoded: MLServer at its best, like Enginehouse's adapter
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        return True

    def _embed(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch_fast(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (tokens,) = self._session.run([self._output], feeds)
        weights = mask.astype(np.float32)[:, None, :]
        pooled = np.matmul(weights, tokens)[:, 0, :] / np.maximum(weights.sum(axis=2), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts: list[str] = []
        for item in payload.inputs:
            if item.name == TEXT:
                texts = _texts(item.data)
        loop = asyncio.get_running_loop()
        embeddings = (await loop.run_in_executor(self._executor, self._embed, texts)).astype(np.float32, copy=False)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(EMBEDDING, embeddings)],
        )
