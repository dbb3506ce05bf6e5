"""The control-plane FastAPI application: routes only translate HTTP; ``Manager`` does the work."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimes.errors import EnginehouseError
from serving.controlplane import cluster, templates
from serving.controlplane.auth import Authenticator
from serving.controlplane.errors import (
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NoRoute,
    RequestTooLarge,
    Unauthorized,
)
from serving.controlplane.manager import Manager
from serving.controlplane.schemas import (
    InferType,
    ModelCreate,
    ModelStatus,
    ModelType,
    Order,
    ServiceCreate,
    ServiceStatus,
    ServiceUpdate,
)
from serving.logs import choose_request_id, request_id
from serving.registry import NotFound
from serving.tokens import presented_token

PAGE = Query(1000, ge=0, le=10_000)
OFFSET = Query(0, ge=0, le=1_000_000_000)
#: management bodies are small JSON; the same limit as inference bodies (ENGINEHOUSE_MAX_BODY_MB, MB)
MAX_BODY = int(float(os.environ.get("ENGINEHOUSE_MAX_BODY_MB", "64")) * 1024 * 1024)
_PROJECT_PATH = re.compile(r"^/v[12]/([^/]+)/")


def _where(loc: tuple[Any, ...]) -> str:
    """``("body", "config", 0, "weight")`` -> ``config[0].weight``."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(exc: RequestValidationError) -> str:
    """One line per problem, each naming the field."""
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            problems.append(f"body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{_where(tuple(err.get('loc', ())))}: {msg}")
    return "; ".join(problems)


class JsonBodies:
    """ASGI middleware: a management request body is JSON whatever its Content-Type says.

    ``curl -d`` labels bodies ``application/x-www-form-urlencoded``; refusing those would only confuse.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def _json(status: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    data = json.dumps(body).encode()
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        },
        {"type": "http.response.body", "body": data},
    ]


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of the management routes: the token is checked before a body is read (a
    caller without one never makes the control plane parse anything), and bodies over ``MAX_BODY`` are
    refused with 413, by their Content-Length or as they stream in."""

    def __init__(self, app: Any, auth: Authenticator, limit: int = MAX_BODY) -> None:
        self.app, self.auth, self.limit = app, auth, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            for message in _json(refusal.status_code, {"error_code": refusal.error_code, "error_msg": refusal.message}):
                await send(message)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            exc = RequestTooLarge(f"the body is over the limit of {self.limit} bytes")
            for message in _json(413, {"error_code": exc.error_code, "error_msg": exc.message}):
                await send(message)

    def _refusal(self, scope: Any, headers: dict[bytes, bytes]) -> EnginehouseError | None:
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return RequestTooLarge(f"the body of {int(length)} bytes is over the limit of {self.limit} bytes")
        match = _PROJECT_PATH.match(scope.get("path", ""))
        if match is None or not self.auth.enabled:
            return None  # the routes check the rest (/metrics: any token; /zstack: its own answer shape)
        presented = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        try:
            project = self.auth.project_of(presented_token(presented))
        except EnginehouseError as exc:  # no token at all
            return exc
        if project is None:
            return Unauthorized("unknown token")
        if project != match.group(1):
            return Forbidden(f"this token belongs to project {project}, not {match.group(1)}")
        return None


def create_app(manager: Manager, auth: Authenticator, lifespan: Any = None) -> FastAPI:
    """The management app over one manager; every project route checks the caller's token."""
    app = FastAPI(title="Enginehouse control plane", version="0.1.0", lifespan=lifespan)
    app.add_middleware(JsonBodies)
    app.add_middleware(Guard, auth=auth)

    @app.middleware("http")
    async def _with_request_id(request: Request, call_next: Any) -> Any:
        rid = choose_request_id(request.headers.get("x-request-id"))
        token = request_id.set(rid)
        try:
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(EnginehouseError)
    async def _enginehouse_error(_: Request, exc: EnginehouseError) -> JSONResponse:
        return JSONResponse({"error_code": exc.error_code, "error_msg": exc.message}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers (no route, wrong method, a body it cannot parse) in our error shape
        err: EnginehouseError
        if exc.status_code == 404:
            err = NoRoute(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:  # 400: a body Starlette cannot parse (JSON nested too deep, an integer of 4,301 digits)
            err = InvalidRequest(f"body: {exc.detail}")
        if request.url.path.startswith("/zstack/"):
            return _zstack_error(err)
        return JSONResponse({"error_code": err.error_code, "error_msg": err.message}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = InvalidRequest(validation_message(exc))
        return JSONResponse({"error_code": err.error_code, "error_msg": err.message}, status_code=err.status_code)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        if auth.enabled:  # any project's token may scrape: the metrics name services of every project
            auth.check(request)
        from prometheus_client import CONTENT_TYPE_LATEST

        from serving.controlplane.metrics import exposition

        return Response(exposition(manager, manager.histograms), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # ZStack's model-service templates: its answer shape, errors included, and its OAuth header
    def _zstack_error(exc: EnginehouseError) -> JSONResponse:
        error = {
            "code": exc.error_code,
            "description": (type(exc).__doc__ or exc.error_code).splitlines()[0],
            "details": exc.message,
            "elaboration": None,
            "opaque": None,
            "cause": None,
        }
        return JSONResponse({"success": False, "error": error}, status_code=exc.status_code)

    def _zstack_project(request: Request) -> str | None:
        """The caller's project (None: auth off, every template is visible)."""
        if not auth.enabled:
            return None
        auth.check(request)
        return auth.project_of(presented_token(request.headers))

    @app.get("/zstack/v1/ai/model-services")
    def zstack_templates(request: Request) -> JSONResponse:
        try:
            rows = manager.registry.list_templates(_zstack_project(request))
        except EnginehouseError as exc:
            return _zstack_error(exc)
        items = [templates.inventory(r, manager.registry.template_users(r.uuid)) for r in rows]
        return JSONResponse({"success": True, "error": None, "inventories": items})

    @app.get("/zstack/v1/ai/model-services/{uuid}")
    def zstack_template(uuid: str, request: Request) -> JSONResponse:
        try:
            project = _zstack_project(request)
            row = manager.registry.get_template(uuid)
            if project is not None and not row.system and row.project_id != project:
                raise NotFound(f"model-service template {uuid} not found")
        except EnginehouseError as exc:
            return _zstack_error(exc)
        item = templates.inventory(row, manager.registry.template_users(row.uuid))
        return JSONResponse({"success": True, "error": None, "inventories": [item]})

    api = APIRouter(dependencies=[Depends(auth.check)])
    # first, so that /services/specifications is matched before /services/{service_id}
    api.include_router(cluster.router)

    @api.get("/v1/{project_id}/models/ai-engine-runtimes")
    def engine_runtimes(project_id: str, limit: int | None = Query(None, ge=1), offset: int = OFFSET) -> dict[str, Any]:
        from runtimes.catalogue import build_catalogue, paginate

        return paginate(build_catalogue(), limit, offset)

    # models ---------------------------------------------------------------------------------------------
    @api.post("/v1/{project_id}/models")
    def register_model(project_id: str, body: ModelCreate) -> dict[str, str]:
        return {"model_id": manager.register_model(project_id, body)}

    @api.get("/v1/{project_id}/models")
    def list_models(
        project_id: str,
        model_name: str | None = Query(None, max_length=128),
        exact_match: bool = False,
        model_version: str | None = Query(None, max_length=32),
        model_status: ModelStatus | None = None,
        description: str | None = Query(None, max_length=1000),
        model_type: ModelType | None = None,
        not_model_type: ModelType | None = None,
        workspace_id: str | None = Query(None, max_length=64),
        offset: int = OFFSET,
        limit: int = PAGE,
        sort_by: str = Query("create_at", pattern="^(create_at|model_version|model_size)$"),
        order: Order = "desc",
    ) -> dict[str, Any]:
        if model_type and not_model_type:
            raise InvalidRequest("model_type and not_model_type cannot be given together")
        total, rows = manager.registry.list_models(
            project_id,
            model_name=model_name,
            exact_match=exact_match,
            model_version=model_version,
            model_status=model_status,
            description=description,
            model_type=model_type,
            not_model_type=not_model_type,
            offset=offset,
            limit=limit,
            sort_by=sort_by,
            order=order,
        )
        return {"total_count": total, "count": len(rows), "models": [manager.model_view(m) for m in rows]}

    @api.get("/v1/{project_id}/models/{model_id}")
    def get_model(project_id: str, model_id: str) -> dict[str, Any]:
        return manager.model_view(manager.registry.get_model(project_id, model_id), detail=True)

    @api.delete("/v1/{project_id}/models/{model_id}")
    def delete_model(project_id: str, model_id: str) -> dict[str, str]:
        manager.registry.delete_model(project_id, model_id)
        return {"model_id": model_id}

    # model-service templates ------------------------------------------------------------------------------
    @api.post("/v1/{project_id}/model-services")
    def create_template(project_id: str, body: templates.TemplateCreate) -> dict[str, str]:
        return {"uuid": templates.create(manager.registry, project_id, body)}

    @api.get("/v1/{project_id}/model-services")
    def list_templates(project_id: str) -> dict[str, Any]:
        rows = manager.registry.list_templates(project_id)
        items = [templates.inventory(r, manager.registry.template_users(r.uuid)) for r in rows]
        return {"total_count": len(items), "count": len(items), "inventories": items}

    @api.get("/v1/{project_id}/model-services/{uuid}")
    def get_template(project_id: str, uuid: str) -> dict[str, Any]:
        row = manager.registry.get_template(uuid)
        if not row.system and row.project_id != project_id:
            raise NotFound(f"model-service template {uuid} not found")
        return templates.inventory(row, manager.registry.template_users(row.uuid))

    @api.delete("/v1/{project_id}/model-services/{uuid}")
    def delete_template(project_id: str, uuid: str) -> dict[str, str]:
        manager.registry.delete_template(project_id, uuid)
        return {"uuid": uuid}

    # services -------------------------------------------------------------------------------------------
    @api.post("/v1/{project_id}/services")
    def create_service(project_id: str, body: ServiceCreate) -> dict[str, str]:
        return {"service_id": manager.create_service(project_id, body)}

    @api.get("/v1/{project_id}/services")
    def list_services(
        project_id: str,
        service_name: str | None = Query(None, max_length=128),
        status: ServiceStatus | None = None,
        infer_type: InferType | None = None,
        offset: int = OFFSET,
        limit: int = PAGE,
        sort_by: str = Query("publish_at", pattern="^(publish_at|service_name|update_time)$"),
        order: Order = "desc",
    ) -> dict[str, Any]:
        total, rows = manager.registry.list_services(
            project_id,
            service_name=service_name,
            status=status,
            infer_type=infer_type,
            offset=offset,
            limit=limit,
            sort_by=sort_by,
            order=order,
        )
        return {"total_count": total, "count": len(rows), "services": [manager.service_view(s) for s in rows]}

    @api.get("/v1/{project_id}/services/{service_id}")
    def get_service(project_id: str, service_id: str) -> dict[str, Any]:
        return manager.service_view(manager.registry.get_service(project_id, service_id))

    @api.put("/v1/{project_id}/services/{service_id}")
    def update_service(project_id: str, service_id: str, body: ServiceUpdate) -> dict[str, Any]:
        return manager.service_view(manager.update_service(project_id, service_id, body))

    @api.delete("/v1/{project_id}/services/{service_id}")
    def delete_service(project_id: str, service_id: str) -> dict[str, str]:
        manager.delete_service(project_id, service_id)
        return {"service_id": service_id}

    @api.get("/v1/{project_id}/services/{service_id}/events")
    def service_events(project_id: str, service_id: str, offset: int = OFFSET, limit: int = PAGE) -> dict[str, Any]:
        row = manager.registry.get_service(project_id, service_id)  # 404 for another project's service too
        events = manager.registry.list_events(service_id)
        page = events[offset : offset + limit]
        return {
            "service_id": row.service_id,
            "service_name": row.service_name,
            "total_count": len(events),
            "count": len(page),
            "events": [
                {
                    "occur_time": e.time,
                    "event_type": "abnormal" if e.event_type in ("failed", "concerning", "waiting") else "normal",
                    "status": e.event_type,
                    "event_info": e.reason,
                }
                for e in page
            ],
        }

    app.include_router(api)
    return app
