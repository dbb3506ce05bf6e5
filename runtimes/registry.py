"""Engines as data: an engine name maps to an import string resolved lazily, so a missing framework
never breaks start-up (it only makes that engine unavailable)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtimes.base import ModelAdapter, ModelConfig, Placement, read_model_config
from runtimes.errors import EngineUnavailableError


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its adapter's import string, the framework it needs and the extra that installs it."""

    name: str
    adapter: str  # "module:Class"
    framework: str | None  # top-level import name of the framework, None when none is needed
    distribution: str | None  # pip distribution whose version names the runtime
    extra: str


ENGINES: dict[str, EngineEntry] = {
    "PyTorch": EngineEntry("PyTorch", "runtimes.pytorch:PyTorchAdapter", "torch", "torch", "torch"),
    "TensorFlow": EngineEntry(
        "TensorFlow", "runtimes.tensorflow:TensorFlowAdapter", "tensorflow", "tensorflow-cpu", "tensorflow"
    ),
    "ONNX": EngineEntry("ONNX", "runtimes.onnx:OnnxAdapter", "onnxruntime", "onnxruntime", "onnx"),
    "MindSpore": EngineEntry("MindSpore", "runtimes.mindspore:MindSporeAdapter", "mindspore", "mindspore", "mindspore"),
    "Custom": EngineEntry("Custom", "runtimes.custom:CustomAdapter", None, None, "all"),
}


def engine_available(engine: str) -> bool:
    """True when the engine's framework package can be imported (checked without importing it)."""
    entry = ENGINES[engine]
    return entry.framework is None or importlib.util.find_spec(entry.framework) is not None


def adapter_class(engine: str) -> type[ModelAdapter]:
    """The adapter class of an engine, importing its module only now."""
    try:
        entry = ENGINES[engine]
    except KeyError:
        raise EngineUnavailableError(engine, "all", f"unknown engine; known: {', '.join(ENGINES)}") from None
    if not engine_available(engine):
        raise EngineUnavailableError(engine, entry.extra, f"package '{entry.framework}' is not installed")
    module_name, cls_name = entry.adapter.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailableError(engine, entry.extra, str(exc)) from exc
    cls: type[ModelAdapter] = getattr(module, cls_name)
    return cls


#: pipelines wrapping an engine's adapter (config.json ``pipeline``): adapter import string and the extra
PIPELINES: dict[str, tuple[str, str]] = {"text-embedding": ("runtimes.text:TextEmbeddingAdapter", "text")}


def pipeline_class(pipeline: str, engine: str) -> Callable[[ModelAdapter], ModelAdapter]:
    """The adapter class of a pipeline, importing its module (and so its packages) only now."""
    try:
        target, extra = PIPELINES[pipeline]
    except KeyError:
        raise EngineUnavailableError(
            engine, "all", f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}"
        ) from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailableError(engine, extra, f"the {pipeline} pipeline needs {exc.name or exc}") from exc
    cls: Callable[[ModelAdapter], ModelAdapter] = getattr(module, cls_name)
    return cls


def make_adapter(
    model_dir: str | Path,
    name: str | None = None,
    placement: Placement | None = None,
    config: ModelConfig | None = None,
) -> ModelAdapter:
    """Build (not load) the adapter for a model version folder; ``config`` defaults to its ``config.json``."""
    config = config or read_model_config(model_dir)
    adapter = adapter_class(config.engine)(model_dir, config, name=name, placement=placement)
    if config.pipeline is not None:
        adapter = pipeline_class(config.pipeline, config.engine)(adapter)
    return adapter


async def load_model(
    model_dir: str | Path,
    name: str | None = None,
    placement: Placement | None = None,
    config: ModelConfig | None = None,
) -> ModelAdapter:
    """Build and load the adapter for a model version folder."""
    adapter = make_adapter(model_dir, name=name, placement=placement, config=config)
    await adapter.load()
    return adapter
