"""The service replica: one Ray Serve deployment that receives a request and runs the engine itself.

One hop on the hot path (see docs/architecture.md): the ingress replica picks the model version by the
service's weights (or ``X-Model-Version``), decodes the payload, runs that version's adapter and encodes
the answer. Weights arrive through ``reconfigure`` so they change live, with no redeploy.
"""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from runtimes.base import ModelAdapter, ModelConfig, Placement
from runtimes.errors import EnginehouseError, InvalidInputError
from runtimes.registry import load_model
from serving.dataplane.codec import decode_request, encode_response

JSON = "application/json"


def _placement(num_cpus: float) -> Placement:
    """The engine's device and thread budget from what Ray gave this replica."""
    import ray

    gpu_ids = tuple(int(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else ()
    # Ray sets CUDA_VISIBLE_DEVICES for the replica, so its first visible GPU is always cuda:0.
    return Placement(device="cuda:0" if gpu_ids else "cpu", cpu_threads=max(1, round(num_cpus)), gpu_ids=gpu_ids)


def _error(exc: EnginehouseError) -> Response:
    return Response(orjson.dumps({"error": exc.message}), status_code=exc.status_code, media_type=JSON)


class ServiceReplica:
    """Serves one service: every version's adapter loaded side by side, chosen per request by weight."""

    # Ray Serve awaits an async constructor, so loading every engine never blocks the replica's loop
    async def __init__(  # type: ignore[misc]
        self, service: str, versions: list[dict[str, Any]], num_cpus: float = 1.0
    ) -> None:
        self.service = service
        self.adapters: dict[str, ModelAdapter] = {}
        placement = _placement(num_cpus)
        for v in versions:
            # a registered model carries its engine config; a bare folder has it in config.json
            config = ModelConfig.model_validate(v["config"]) if v.get("config") else None
            self.adapters[v["version"]] = await load_model(
                v["model_dir"], name=f"{service}:{v['version']}", placement=placement, config=config
            )
        self._names: list[str] = list(self.adapters)
        self._weights: list[int] = [int(v.get("weight", 100)) for v in versions]

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live traffic weights: ``{"weights": {"1.0.0": 70, "2.0.0": 30}}``; no reload, no request lost."""
        weights = user_config.get("weights") or {}
        if weights:
            self._names = [v for v in self.adapters if v in weights]
            self._weights = [int(weights[v]) for v in self._names]

    def _pick(self, pinned: str | None) -> tuple[str, ModelAdapter]:
        if pinned:
            adapter = self.adapters.get(pinned)
            if adapter is None:
                raise _UnknownVersion(self.service, pinned, list(self.adapters))
            return pinned, adapter
        version = self._names[0] if len(self._names) == 1 else random.choices(self._names, self._weights)[0]
        return version, self.adapters[version]

    async def __call__(self, request: Request) -> Response:
        try:
            version, adapter = self._pick(request.headers.get("x-model-version"))
            body = await request.body()
            if hasattr(adapter, "forward"):  # Custom engines get the request verbatim
                return await self._forward(adapter, request, body)
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidInputError(adapter.name, f"body is not valid JSON: {exc}") from None
            inputs, meta = decode_request(adapter.name, payload, adapter.signature)
            outputs = await adapter.infer(inputs)
            return Response(orjson.dumps(encode_response(self.service, version, outputs, meta)), media_type=JSON)
        except EnginehouseError as exc:
            return _error(exc)

    async def _forward(self, adapter: Any, request: Request, body: bytes) -> Response:
        root = request.scope.get("root_path", "")
        path = request.url.path
        sub = path[len(root) :] if root and path.startswith(root) else path
        status, headers, content = await adapter.forward(
            request.method, sub or "/", dict(request.headers), body, request.url.query
        )
        return Response(content, status_code=status, headers=headers)

    async def check_health(self) -> None:
        """Ray Serve's health probe: every adapter must say it is healthy, else the replica restarts."""
        for version, adapter in self.adapters.items():
            if not await adapter.health():
                raise RuntimeError(f"{self.service} version {version} is unhealthy")

    async def __del__(self) -> None:
        for adapter in self.adapters.values():
            await adapter.unload()


class _UnknownVersion(EnginehouseError):
    status_code = 404
    error_code = "EH.0201"

    def __init__(self, service: str, version: str, known: list[str]) -> None:
        super().__init__(f"service {service} has no model version {version}; versions: {', '.join(known)}")


def build_app(service: str, versions: list[dict[str, Any]], actor_options: dict[str, Any]) -> serve.Application:
    """The Ray Serve application of one service: ingress replicas that run the engines themselves.

    Replica counts, autoscaling and weights come from the config's ``deployments`` entry (see
    ``serving.dataplane.deploy.service_app``), so they change without a new code version.
    """
    deployment = serve.deployment(
        name="replica",
        # batching needs many requests in flight per replica; Ray's default of 5 would cap throughput
        max_ongoing_requests=int(os.environ.get("ENGINEHOUSE_MAX_ONGOING", "64")),
        ray_actor_options=actor_options,
    )(ServiceReplica)
    return deployment.bind(service, versions, float(actor_options.get("num_cpus", 1.0)))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder named by the declarative config (see ``serving.dataplane.deploy``)."""
    return build_app(args["service"], args["versions"], dict(args.get("actor_options") or {"num_cpus": 1.0}))
