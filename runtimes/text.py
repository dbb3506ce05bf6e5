"""Text-embedding pipeline: BYTES text in, L2-normalised FP32 sentence embeddings out, around any tensor engine.

``config.json`` with ``"pipeline": "text-embedding"`` makes :func:`runtimes.registry.make_adapter` wrap the
engine's adapter (ONNX, PyTorch, ...) in :class:`TextEmbeddingAdapter`. The engine runs a transformer encoder:
INT64 ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where it takes them) [batch, sequence] in, token
embeddings [batch, sequence, dim] out. Around it this adapter does what sentence-transformers does for a
mean-pooling model such as all-MiniLM-L6-v2: tokenise the batch (padded to its longest text, truncated at
``max_seq_length``), average the token embeddings over the attention mask, and divide by the L2 norm.

Tokenising and pooling run on this adapter's own thread and the encoder on the engine's, so neither blocks the
event loop and, with batches in flight together, one batch is tokenised while the engine runs another. A small
batch (at most ``INLINE_TEXTS`` texts and ``INLINE_BYTES`` bytes of text: a few sentences) is tokenised and pooled
on the caller's thread instead: that takes tens of microseconds, less than the two hand-offs to this adapter's
thread, which under load also wait for a core (benchmarks/README.md, "text.py").
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer  # the ``text`` extra; imported only when a pipeline is configured

from runtimes.base import ModelAdapter, Signature, TensorSpec, dtype_for
from runtimes.errors import InvalidInputError, ModelLoadError

TEXT_INPUT, EMBEDDING_OUTPUT = "text", "embedding"
DEFAULT_TOKENIZER = "tokenizer.json"
#: encoder inputs this pipeline can fill, and where from in a tokenizers Encoding
ENCODER_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
#: the encoder output taken as token embeddings, by name; otherwise the only 3-D output
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
#: a batch of at most this many texts, and this many bytes of text in all, is tokenised and pooled inline
INLINE_TEXTS, INLINE_BYTES = 4, 1024


def decode_texts(model: str, values: np.ndarray) -> list[str]:
    """The elements of a BYTES tensor as ``str``: ``bytes`` decoded as UTF-8, ``str`` (numpy ``U``) as is."""
    texts: list[str] = []
    for i, value in enumerate(values.tolist()):
        if isinstance(value, bytes):
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    model, f"element {i} is not valid UTF-8 text ({exc.reason} at byte {exc.start})", TEXT_INPUT
                ) from None
        elif isinstance(value, str):
            texts.append(value)
        else:
            raise InvalidInputError(model, f"element {i} is {type(value).__name__}, not text", TEXT_INPUT)
    return texts


def mean_pool_normalize(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token embeddings [batch, sequence, dim] where mask [batch, sequence] is 1, L2-normalised.

    sentence-transformers' Pooling (mean) then Normalize: sum(tokens * mask) / max(sum(mask), 1e-9), then
    x / max(|x|, 1e-12). The masked sum is one batched matrix product, [b, 1, s] @ [b, s, d], so no
    [b, s, d] temporary is made.
    """
    weights = mask.astype(np.float32, copy=False)[:, None, :]
    summed = np.matmul(weights, tokens.astype(np.float32, copy=False))[:, 0, :]
    summed /= np.maximum(weights.sum(axis=2), 1e-9)
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    return summed


def _small(values: np.ndarray) -> bool:
    """At most INLINE_TEXTS texts of INLINE_BYTES in all (characters for numpy ``U`` strings)."""
    if values.shape[0] > INLINE_TEXTS:
        return False
    total = 0
    for value in values.tolist():
        total += len(value) if isinstance(value, bytes | str) else INLINE_BYTES + 1  # not text: decode reports it
    return total <= INLINE_BYTES


class TextEmbeddingAdapter(ModelAdapter):
    """Wraps an engine adapter (given built, not loaded): tokenises BYTES text, runs it, pools and normalises."""

    extra = "text"

    def __init__(self, inner: ModelAdapter) -> None:
        super().__init__(inner.model_dir, inner.config, name=inner.name, placement=inner.placement)
        self.inner = inner
        # the platform reported in model metadata is the engine that runs the model
        self.engine = inner.engine  # type: ignore[misc]
        self.tokenizer: Tokenizer | None = None
        self._feeds: list[tuple[str, str, np.dtype]] = []  # (encoder input, Encoding attribute, dtype)
        self._output = ""
        self._dim = -1

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer file named by config.json, relative to the version folder."""
        return str(self.model_dir / (self.config.tokenizer or DEFAULT_TOKENIZER))

    def _open_tokenizer(self) -> Tokenizer:
        tok = Tokenizer.from_file(self.tokenizer_path)
        # tokenizer.json files often carry the settings they were saved with (all-MiniLM-L6-v2's: truncation
        # at 128 and padding to a fixed 128); sentence-transformers replaces both, and so does this
        pad = tok.padding or {}
        pad_token = pad.get("pad_token", "[PAD]")
        pad_id = pad.get("pad_id", tok.token_to_id(pad_token) or 0)
        tok.enable_padding(
            direction=pad.get("direction", "right"),
            pad_id=pad_id,
            pad_type_id=pad.get("pad_type_id", 0),
            pad_token=pad_token,
            length=None,  # to the longest text of the batch
        )
        tok.enable_truncation(max_length=self.config.max_seq_length)
        return tok

    def _plan(self, signature: Signature) -> tuple[list[tuple[str, str, np.dtype]], TensorSpec]:
        """Which tokenizer arrays feed which encoder inputs, and which output holds the token embeddings."""
        feeds = []
        for spec in signature.inputs:
            if spec.name not in ENCODER_INPUTS:
                raise ValueError(f"encoder input '{spec.name}' is not one of {sorted(ENCODER_INPUTS)}")
            if spec.datatype not in ("INT64", "INT32") or len(spec.shape) != 2:
                raise ValueError(
                    f"encoder input '{spec.name}' is {spec.datatype} {list(spec.shape)}, not INT64 [-1, -1]"
                )
            feeds.append((spec.name, ENCODER_INPUTS[spec.name], dtype_for(spec.datatype)))
        if not any(name == "input_ids" for name, _, _ in feeds):
            raise ValueError("the encoder takes no 'input_ids'")
        by_name = {t.name: t for t in signature.outputs}
        named = [by_name[n] for n in TOKEN_OUTPUTS if n in by_name]
        three_d = [t for t in signature.outputs if len(t.shape) == 3]
        output = named[0] if named else (three_d[0] if len(three_d) == 1 else None)
        if output is None or len(output.shape) != 3:
            raise ValueError(f"no token-embedding output [batch, sequence, dim] among {list(by_name)}")
        return feeds, output

    async def load(self) -> Signature:
        """Load the engine, then the tokenizer; the signature is text in, one embedding per text out."""
        inner_sig = await self.inner.load()
        try:
            feeds, output = self._plan(inner_sig)
        except ValueError as exc:
            await self.inner.unload()
            raise ModelLoadError(self.name, f"not a text encoder for the text-embedding pipeline: {exc}") from exc
        try:
            self.tokenizer = await self.run_blocking(self._open_tokenizer)
        except Exception as exc:  # tokenizers raises its own Exception for a missing or malformed file
            await self.inner.unload()
            raise ModelLoadError(self.name, f"tokenizer {self.tokenizer_path} could not be loaded: {exc}") from exc
        self._feeds, self._output, self._dim = feeds, output.name, output.shape[2]
        self.signature = Signature(
            (TensorSpec(TEXT_INPUT, "BYTES", (-1,)),),
            (TensorSpec(EMBEDDING_OUTPUT, "FP32", (-1, self._dim)),),
        )
        self.ready = True
        return self.signature

    def _tokenize(self, values: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The encoder's inputs for a batch of texts, and the attention mask that pooling needs."""
        assert self.tokenizer is not None
        encodings = self.tokenizer.encode_batch_fast(decode_texts(self.name, values))
        feeds = {name: np.array([getattr(e, attr) for e in encodings], dtype=dt) for name, attr, dt in self._feeds}
        mask = feeds.get("attention_mask")
        if mask is None:  # an encoder that takes no mask: pooling still skips the padding
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return feeds, mask

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokenise on this adapter's thread, encode on the engine's, pool and normalise on this one's (a small
        batch: tokenise and pool here)."""
        values = inputs[TEXT_INPUT]
        if values.shape[0] == 0:
            return {EMBEDDING_OUTPUT: np.zeros((0, max(self._dim, 0)), np.float32)}
        if _small(values):
            feeds, mask = self._tokenize(values)
            tokens = (await self.inner.predict(feeds))[self._output]
            return {EMBEDDING_OUTPUT: mean_pool_normalize(tokens, mask)}
        feeds, mask = await self.run_blocking(self._tokenize, values)
        tokens = (await self.inner.predict(feeds))[self._output]
        return {EMBEDDING_OUTPUT: await self.run_blocking(mean_pool_normalize, tokens, mask)}

    async def unload(self) -> None:
        """Unload the engine, drop the tokenizer, stop this adapter's thread."""
        await self.inner.unload()
        self.tokenizer = None
        await super().unload()

    async def health(self) -> bool:
        """Healthy while loaded and the engine says it is."""
        return self.ready and await self.inner.health()
