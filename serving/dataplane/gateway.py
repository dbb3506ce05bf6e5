"""The Open Inference Protocol at the data plane's root: ``/v2/models/{service_name}/...`` without the
service's access address in front.

A Serve application routes by path prefix and a service's prefix is its access address, so the root
routes are one small application (``/v2``) that finds the service by name and calls its replica's
transport-free ``handle`` through a deployment handle: a second hop, which the access address avoids
(measured in benchmarks/README.md). Its map of names and the tokens arrive through ``reconfigure``.
"""

from __future__ import annotations

import re
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from runtimes.errors import EnginehouseError
from serving.dataplane import deploy
from serving.dataplane.replica import (
    MAX_BODY,
    SERVER_METADATA,
    BodyTooLarge,
    Reply,
    UnknownRoute,
    error_reply,
    http_response,
    json_reply,
)
from serving.tokens import hash_token

APP = "enginehouse-v2"
PREFIX = "/v2"
_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?P<rest>/.*)?$")


class Gateway:
    """Finds a service by name and forwards the OIP request to it."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, str]] = {}  # project -> {service name: service id}
        self.tokens: dict[str, str] = {}  # sha256 -> project; empty: auth off
        self._handles: dict[str, Any] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        """The running services by project, and the token hashes (live, from the reconciler)."""
        self.services = config.get("services") or {}
        self.tokens = config.get("tokens") or {}

    def _service_id(self, name: str, headers: Any) -> str:
        token = headers.get("x-auth-token")
        project = self.tokens.get(hash_token(token)) if token and self.tokens else None
        if project is not None:
            found = self.services.get(project, {}).get(name)
            candidates = [found] if found else []
        else:  # no usable token: the name must be unique across projects (the replica checks access)
            candidates = [ids[name] for ids in self.services.values() if name in ids]
        if len(candidates) != 1:
            why = "no running service" if not candidates else "several services (in different projects)"
            raise UnknownRoute(f"{why} named {name}; use the service's access_address")
        return candidates[0]

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path in ("/v2", "/v2/"):
            return http_response(json_reply(SERVER_METADATA))
        if path.startswith("/v2/health/"):
            return http_response(json_reply({"live": True} if path.endswith("/live") else {"ready": True}))
        try:
            m = _MODEL.match(path)
            if m is None:
                raise UnknownRoute(f"{request.method} {path} is not served")
            sid = self._service_id(m["name"], request.headers)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY:  # refused before reading, as the replica does
                raise BodyTooLarge(f"the body of {length} bytes is over the limit of {MAX_BODY} bytes")
            body = await request.body()
            if len(body) > MAX_BODY:
                raise BodyTooLarge(f"the body of {len(body)} bytes is over the limit of {MAX_BODY} bytes")
            reply = await self._forward(sid, request.method, path, dict(request.headers), body, request.url.query)
        except EnginehouseError as exc:
            reply = error_reply(exc)
        return http_response(reply)

    async def _forward(self, sid: str, method: str, path: str, headers: dict[str, str], body: bytes, q: str) -> Reply:
        handle = self._handles.get(sid)
        if handle is None:
            handle = self._handles[sid] = serve.get_app_handle(sid)
        result: Reply = await handle.options(method_name="handle").remote(method, path, headers, body, q)
        return result


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The gateway application named by the declarative config."""
    del args
    return serve.deployment(
        name="gateway",
        max_ongoing_requests=256,
        # no CPU reserved: it forwards, and a reservation would take a core share the replicas were sized for
        ray_actor_options={"num_cpus": 0},
    )(Gateway).bind()


def gateway_app(services: dict[str, dict[str, str]], tokens: dict[str, str]) -> dict[str, Any]:
    """The gateway's Serve application config; the map and tokens live in ``user_config``."""
    return {
        "name": APP,
        "route_prefix": PREFIX,
        "import_path": "serving.dataplane.gateway:app_builder",
        "args": {},
        "deployments": [{"name": "gateway", "user_config": {"services": services, "tokens": tokens}}],
        "logging_config": {"enable_access_log": False, "encoding": deploy._log_encoding()},
    }
