"""PyTorch engine: runs TorchScript (``.pt``) and torch.export archives (``.pt2``) on CPU or CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch  # imported only here, so the other engines never need torch

from runtimes.base import ModelAdapter, Signature, TensorSpec
from runtimes.datatypes import OIP_TO_NUMPY, oip_datatype
from runtimes.errors import ModelLoadError

SIGNATURE_FILE = "signature.json"

_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.bool: np.dtype(np.bool_),
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


def _specs(items: list[dict[str, Any]], path: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for item in items:
        if item["datatype"] not in OIP_TO_NUMPY:
            raise ValueError(f"{path}: unknown datatype {item['datatype']!r}")
        specs.append(TensorSpec(str(item["name"]), item["datatype"], tuple(int(d) for d in item["shape"])))
    return tuple(specs)


def read_signature_file(path: Path) -> Signature:
    """Parse a ``signature.json`` (``{"inputs": [{name, datatype, shape}], "outputs": [...]}``)."""
    raw = json.loads(path.read_text())
    return Signature(_specs(raw["inputs"], path), _specs(raw.get("outputs", []), path))


def _spec_from_fake(name: str, val: Any) -> TensorSpec:
    # symbolic (dynamic) dims come back as SymInt, not int: those are -1
    shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
    return TensorSpec(name, oip_datatype(_TORCH_TO_NUMPY[val.dtype]), shape)


def _signature_from_export(program: Any) -> Signature:
    """Signature of a torch.export program from the fake tensors its graph records."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = tuple(
        _spec_from_fake(name, placeholders[name].meta["val"]) for name in program.graph_signature.user_inputs
    )
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = tuple(_spec_from_fake(f"output_{i}", arg.meta["val"]) for i, arg in enumerate(out_node.args[0]))
    return Signature(inputs, outputs)


class PyTorchAdapter(ModelAdapter):
    """Serves a TorchScript module or a torch.export program; signature from ``signature.json``."""

    engine = "PyTorch"
    extra = "torch"
    default_file = "model.pt"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.module: Any = None
        self.device = torch.device(self.placement.device if self.placement.uses_gpu else "cpu")

    def _load(self, path: Path) -> tuple[Any, Signature | None]:
        # torch's thread count is process-wide; the replica owns its process, so setting it here is right
        torch.set_num_threads(self.placement.cpu_threads)
        if path.suffix == ".pt2":
            program = torch.export.load(str(path))
            module = program.module().to(self.device)
            return module, _signature_from_export(program)
        module = torch.jit.load(str(path), map_location=self.device)
        module.eval()
        return module, None

    async def load(self) -> Signature:
        """Load the module onto the placement's device and read its signature."""
        path = self.require_file()
        sig_path = path.parent / SIGNATURE_FILE
        try:
            module, derived = await self.run_blocking(self._load, path)
        except Exception as exc:  # torch raises RuntimeError/pickle errors for bad archives
            raise ModelLoadError(self.name, f"{path} is not a loadable PyTorch model: {exc}") from exc
        if sig_path.exists():
            try:
                signature = read_signature_file(sig_path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(self.name, f"{sig_path} is not a valid signature: {exc}") from exc
        elif derived is not None:
            signature = derived
        else:
            # TorchScript keeps no tensor names or shapes, so without the file inputs cannot be validated
            raise ModelLoadError(self.name, f"{sig_path} not found; TorchScript models need a signature file")
        self.module = module
        self.signature = signature
        self.ready = True
        return signature

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.signature is not None
        # positional arguments in the signature's input order: TorchScript forward() has no names to bind
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.device) for t in self.signature.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        tensors = list(result) if isinstance(result, list | tuple) else [result]
        names = [t.name for t in self.signature.outputs]
        if len(names) != len(tensors):
            raise ValueError(f"model returned {len(tensors)} output(s), signature names {len(names)}")
        return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the module under inference_mode on the engine thread; outputs named by the signature."""
        return await self.run_blocking(self._run, inputs)

    async def unload(self) -> None:
        """Drop the module (and the CUDA cache when on a GPU), then stop the engine thread."""
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        await super().unload()
