"""The one engine-adapter interface that replicas, batch jobs, the CLI and the tests all use."""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtimes.datatypes import OIP_TO_NUMPY, oip_datatype
from runtimes.errors import InferenceError, InvalidInputError, ModelLoadError, ModelNotReadyError

EngineName = Literal["PyTorch", "TensorFlow", "ONNX", "MindSpore", "Custom"]
CONFIG_FILE = "config.json"
T = TypeVar("T")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature: OIP datatype and shape, -1 for a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """The OIP v2 metadata form: ``{name, datatype, shape}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def as_dict(self) -> dict[str, Any]:
        """``{"inputs": [...], "outputs": [...]}`` in OIP v2 metadata form."""
        return {"inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}


@dataclass(frozen=True)
class Placement:
    """Where a replica runs its engine: the device and the CPU threads it may use."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    cpu_threads: int = 1
    gpu_ids: tuple[int, ...] = ()
    npu_ids: tuple[int, ...] = ()
    cpus: float | None = None  # the exact CPU share reserved (None: cpu_threads); a container's --cpus
    memory_mb: int | None = None  # the memory reserved, MB; a container's --memory

    @property
    def uses_gpu(self) -> bool:
        """True when the engine should run on an NVIDIA GPU."""
        return self.device.startswith("cuda")


class ModelConfig(BaseModel):
    """The small ``config.json`` beside a model's files, naming its engine and runtime."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineName = Field(description="The engine that runs the files.")
    runtime: str | None = Field(default=None, description="A runtime name from the catalogue.")
    model_file: str | None = Field(default=None, description="File or folder, relative to the version dir.")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Largest batch the engine is given.")
    # Pipelines: pre/post-processing around the engine (runtimes/text.py), None for the bare engine
    pipeline: Literal["text-embedding"] | None = Field(
        default=None, description="Wrap the engine: 'text-embedding' takes BYTES text, returns FP32 embeddings."
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer file (tokenizers JSON), relative to the version dir; tokenizer.json."
    )
    max_seq_length: int = Field(default=256, ge=1, le=8192, description="Tokens per text; longer is truncated.")
    # Custom engines only
    start_command: list[str] | None = Field(default=None, description="Argument list of the user's server.")
    image: str | None = Field(default=None, description="Container image of the user's server.")
    container_command: list[str] | None = None
    container_args: list[str] | None = None
    port: int | None = Field(default=None, ge=1024, le=65535)
    health_path: str = "/health"
    env: dict[str, str] = Field(default_factory=dict)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``config.json`` of one model version folder."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(str(model_dir), f"{CONFIG_FILE} not found in {model_dir}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(str(model_dir), f"{path} is not valid JSON: {exc}") from None
    try:
        return ModelConfig.model_validate(raw)
    except ValueError as exc:
        raise ModelLoadError(str(model_dir), f"{path}: {exc}") from None


class ModelAdapter(ABC):
    """Base of every engine adapter. ``predict`` is the only method an engine must write.

    Call order: ``load()`` once, then ``infer()`` any number of times (concurrently allowed), ``unload()``
    once. Engines run their blocking framework calls through :meth:`run_blocking`, so the event loop never
    blocks; one engine thread per adapter keeps frameworks that are not thread-safe correct.
    """

    engine: ClassVar[str] = ""
    #: the extra that installs this engine's framework
    extra: ClassVar[str] = ""
    #: file name looked for in the version folder when config.json names none
    default_file: ClassVar[str] = ""

    def __init__(
        self, model_dir: str | Path, config: ModelConfig, name: str | None = None, placement: Placement | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.name = name or self.model_dir.name
        self.placement = placement or Placement()
        self.signature: Signature | None = None
        self.ready = False
        self._executor: ThreadPoolExecutor | None = None

    # -- overridable -------------------------------------------------------------------------------
    async def load(self) -> Signature:
        """Called once before serving: load the files and return the input/output signature."""
        self.ready = True
        self.signature = Signature((), ())
        return self.signature

    @abstractmethod
    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Called per batch with validated inputs (first dimension = batch); returns named outputs."""

    async def unload(self) -> None:
        """Called once when the replica stops: free the engine's memory and threads."""
        self.ready = False
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def health(self) -> bool:
        """Called by the replica's health check; False makes Ray Serve restart the replica."""
        return self.ready

    # -- shared machinery --------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        """The model file or folder inside the version folder."""
        return self.model_dir / (self.config.model_file or self.default_file)

    def require_file(self) -> Path:
        """The model path, or a ModelLoadError naming what is missing."""
        path = self.model_path
        if not path.exists():
            raise ModelLoadError(self.name, f"model file {path} does not exist")
        return path

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking framework call on this adapter's engine thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, datatypes and shapes against the signature; cast nothing silently."""
        if not self.ready or self.signature is None:
            raise ModelNotReadyError(self.name)
        expected = {t.name: t for t in self.signature.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise InvalidInputError(self.name, f"unknown input(s) {unknown}; expected {sorted(expected)}", unknown[0])
        missing = sorted(set(expected) - set(inputs))
        if missing:
            raise InvalidInputError(self.name, f"missing input; expected inputs {sorted(expected)}", missing[0])
        out: dict[str, np.ndarray] = {}
        for name, spec in expected.items():
            arr = np.asarray(inputs[name])
            got = oip_datatype(arr.dtype) if arr.dtype.kind not in "SU" else "BYTES"
            if got != spec.datatype:
                raise InvalidInputError(self.name, f"datatype {got} given, {spec.datatype} expected", name)
            if len(arr.shape) != len(spec.shape) or any(
                e != -1 and e != g for e, g in zip(spec.shape, arr.shape, strict=False)
            ):
                raise InvalidInputError(
                    self.name, f"shape {list(arr.shape)} given, {list(spec.shape)} expected (-1: any)", name
                )
            out[name] = arr
        return out

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, then predict; engine exceptions become InferenceError with the engine's message."""
        checked = self.validate(inputs)
        try:
            return await self.predict(checked)
        except (InvalidInputError, ModelNotReadyError):
            raise
        except Exception as exc:  # the engine's own error, reported with its message
            raise InferenceError(self.name, f"{type(exc).__name__}: {exc}") from exc


def dtype_for(datatype: str) -> np.dtype:
    """numpy dtype of an OIP datatype (helper for engines mapping their own type names)."""
    return OIP_TO_NUMPY[datatype]


@dataclass
class LoadedModel:
    """An adapter after ``load()``, with the config it came from."""

    adapter: ModelAdapter
    config: ModelConfig
    extra: dict[str, Any] = field(default_factory=dict)
