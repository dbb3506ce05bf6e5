"""The control-plane FastAPI application (management API, catalogue, health)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from runtimes.errors import EnginehouseError


def create_app(services: dict[str, dict[str, Any]], data_address: str) -> FastAPI:
    """The management app; ``services`` maps a deployed service's id to its description."""
    app = FastAPI(title="Enginehouse control plane", version="0.1.0")

    @app.exception_handler(EnginehouseError)
    async def _enginehouse_error(_: Request, exc: EnginehouseError) -> JSONResponse:
        return JSONResponse({"error_code": exc.error_code, "error_msg": exc.message}, status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/{project_id}/models/ai-engine-runtimes")
    async def engine_runtimes(
        project_id: str, limit: int | None = Query(None, ge=1), offset: int = Query(0, ge=0)
    ) -> dict[str, Any]:
        from runtimes.catalogue import build_catalogue, paginate

        return paginate(build_catalogue(), limit, offset)

    @app.get("/v1/{project_id}/services")
    async def list_services(project_id: str) -> dict[str, Any]:
        from ray import serve

        status = serve.status().applications
        items = []
        for sid, svc in services.items():
            app_status = status.get(sid)
            state = str(app_status.status.value if app_status else "NOT_STARTED").lower()
            items.append(
                {
                    "service_id": sid,
                    "service_name": svc["service_name"],
                    "infer_type": "real-time",
                    "status": {"running": "running", "deploying": "deploying"}.get(state, state),
                    "access_address": f"{data_address}/v1/infers/{sid}",
                    "config": [
                        {"model_name": svc["model_name"], "model_version": v["version"], "weight": v["weight"]}
                        for v in svc["versions"]
                    ],
                }
            )
        return {"total_count": len(items), "count": len(items), "services": items}

    return app
