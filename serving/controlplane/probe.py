"""Model validation: load a registered version with its real engine in a Ray worker and read its signature.

The probe runs as a Ray task rather than in the control plane, so a framework (TensorFlow, MindSpore, ...)
is never imported into the control plane's process, and a crashing engine takes only the worker down.
``max_calls=1`` hands the worker's memory back as soon as the probe is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from runtimes.base import ModelConfig


@ray.remote(num_cpus=0, max_calls=1)
def _probe(model_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from runtimes.registry import load_model

    async def run() -> dict[str, Any]:
        adapter = await load_model(model_dir, config=ModelConfig.model_validate(config))
        try:
            assert adapter.signature is not None
            return {"signature": adapter.signature.as_dict()}
        finally:
            await adapter.unload()

    try:
        return asyncio.run(run())
    except Exception as exc:  # sent back as text: our errors' constructors do not survive unpickling
        return {"error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"}


def start(model_dir: str, config: dict[str, Any]) -> ray.ObjectRef:
    """Start the probe on this node (where the files are); the ref resolves to :func:`probe`'s answer."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True)).remote(
        model_dir, config
    )


async def probe(model_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """``{"signature": ...}`` or ``{"error": the engine's reason}``, loaded on this node (where the files are)."""
    result: dict[str, Any] = await start(model_dir, config)
    return result
