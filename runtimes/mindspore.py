"""MindSpore engine: a native MindIR file run through ``nn.GraphCell``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from runtimes.base import ModelAdapter, Signature, TensorSpec
from runtimes.datatypes import OIP_TO_NUMPY
from runtimes.errors import ModelLoadError

SIGNATURE_FILE = "signature.json"


def _specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    out = []
    for item in raw:
        datatype = str(item["datatype"])
        if datatype not in OIP_TO_NUMPY:
            raise ValueError(f"{where}: unknown datatype {datatype!r}")
        out.append(TensorSpec(str(item["name"]), datatype, tuple(int(d) for d in item["shape"])))
    if not out:
        raise ValueError(f"{where}: no tensors listed")
    return tuple(out)


class MindSporeAdapter(ModelAdapter):
    """Runs a MindIR file; names and types come from ``signature.json`` (MindIR's own names are opaque)."""

    engine = "MindSpore"
    extra = "mindspore"
    default_file = "model.mindir"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cell: Any = None

    def _read_signature(self) -> Signature:
        path = self.model_path.parent / SIGNATURE_FILE
        try:
            raw = json.loads(path.read_text())
            return Signature(_specs(raw["inputs"], "inputs"), _specs(raw["outputs"], "outputs"))
        except FileNotFoundError:
            raise ModelLoadError(self.name, f"{path} not found; a MindIR model needs it") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(self.name, f"{path} is invalid: {type(exc).__name__}: {exc}") from None

    def _device_target(self) -> tuple[str, int]:
        if self.placement.npu_ids:
            return "Ascend", self.placement.npu_ids[0]
        if self.placement.uses_gpu:
            return "GPU", int(self.placement.device.partition(":")[2] or 0)
        return "CPU", 0

    async def load(self) -> Signature:
        """Load the MindIR graph and the signature written beside it."""
        path = self.require_file()
        signature = self._read_signature()
        await self.run_blocking(self._load, str(path))
        self.signature = signature
        self.ready = True
        return signature

    def _load(self, path: str) -> None:
        import mindspore as ms  # imported only here so the server starts without MindSpore

        target, device_id = self._device_target()
        # set_device is process-wide and may be called only once; a later model in the same process
        # keeps the first target
        try:
            if target == "CPU":
                ms.set_device(target)
            else:
                ms.set_device(target, device_id)
        except RuntimeError:
            pass
        try:
            graph = ms.load(path)
            self._cell = ms.nn.GraphCell(graph)
        except Exception as exc:  # MindSpore raises RuntimeError/ValueError/... for corrupt files
            raise ModelLoadError(self.name, f"{type(exc).__name__}: {exc}") from None

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on the engine thread."""
        return await self.run_blocking(self._predict, inputs)

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import mindspore as ms

        assert self.signature is not None
        # GraphCell takes positional inputs in the exported order, which signature.json records
        args = [ms.Tensor(np.ascontiguousarray(inputs[t.name])) for t in self.signature.inputs]
        result = self._cell(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        return {spec.name: out.asnumpy() for spec, out in zip(self.signature.outputs, results, strict=True)}

    async def unload(self) -> None:
        """Drop the graph."""
        self._cell = None
        await super().unload()
