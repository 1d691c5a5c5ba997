"""The FastAPI application: routers, error mapping, the dashboard's static files."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from freshpool.api.routes import metrics, nodes, pool, requests, status, usage
from freshpool.api.services import Services
from freshpool.core.errors import HTTP_STATUS, FreshpoolError, code_for

DESCRIPTION = """\
Single-use CI nodes from a warm pool. Ask for a node set with `POST /requests`
(wait with `?wait=S`, `GET /requests/{id}?wait=S` or the server-sent events at
`GET /requests/{id}/events`), mark the job started with `POST /nodes/{id}/in-use`,
and release the set with `POST /nodes/{id}/release` when the job ends.

Changes need a bearer token (`freshpool token create --tenant T`); a token sees and
acts on its tenant's requests and nodes only.
"""


def create_app(svc: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.changes.start()
        svc.scheduler.start()
        try:
            yield
        finally:
            await svc.scheduler.stop()
            await svc.changes.stop()

    app = FastAPI(
        title="freshpool",
        version=metadata.version("freshpool"),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = svc
    app.state.pool_registry = metrics.registry_for(svc)
    _error_handlers(app, known=", ".join(x.name for x in svc.config.labels))
    # Requests first: routes are matched in order, and POST /requests is what CI
    # calls most (each route tried before it costs microseconds on every call).
    most = max(p.max_nodes for p in svc.config.providers)
    app.include_router(requests.create_router([x.name for x in svc.config.labels], most))
    for module in (requests, pool, nodes, status, usage, metrics):
        app.include_router(module.router)
    _honest_openapi(app, open_reads=svc.config.api.open_status)
    static = Path(str(resources.files("freshpool.api").joinpath("static")))
    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


def _error_handlers(app: FastAPI, known: str) -> None:
    """Every error's answer: 422s that name the field, and each FreshpoolError's
    status from the one table (core/errors.py)."""

    @app.exception_handler(RequestValidationError)
    async def _bad_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        sent = request.headers.get("content-type", "none")
        problems = [_explained(problem, sent, known) for problem in exc.errors()]
        return JSONResponse({"detail": _finite(jsonable_encoder(problems))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list them all.
            headers["Allow"] = ", ".join(_methods_for(app, request))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(FreshpoolError)
    async def _ours(_request: Request, exc: FreshpoolError) -> JSONResponse:
        status = code_for(exc, HTTP_STATUS, 500)
        headers = {"Retry-After": "1"} if status == 503 else None
        detail = str(exc).strip("'\"")
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    async def _store_failed(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # A locked, full or unreachable database: the transaction rolled back, so
        # nothing changed and the call may simply be made again.
        cause = getattr(exc, "orig", None) or exc
        return JSONResponse(
            {
                "detail": f"the state store failed ({type(cause).__name__}: {cause});"
                " nothing was changed, try again"
            },
            status_code=503,
            headers={"Retry-After": "1"},
        )


def _explained(problem: Any, sent: str, known: str) -> Any:
    """A validation problem said so a person knows what to send instead."""
    if problem["type"] == "literal_error" and tuple(problem["loc"][:2]) == ("body", "labels"):
        return {**problem, "msg": f"unknown label {problem['input']!r} (known: {known})"}
    if tuple(problem["loc"]) == ("body",) and "json" not in sent:
        # `curl -d` sends a form: say what to send instead of "not a dictionary".
        return {
            **problem,
            "msg": f"the body must be JSON with Content-Type: application/json"
            f" (this one came as {sent}; with curl use --json)",
        }
    return problem


def _honest_openapi(app: FastAPI, open_reads: bool) -> None:
    """Make the generated spec say what the server does, so clients and fuzzers can trust it.

    FastAPI marks every operation with a bearer dependency as needing the token, and
    gives an event stream's error responses the stream's media type. Here reads say
    the token is optional when status is open, and errors are JSON everywhere.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in spec.get("paths", {}).values():
            for method, operation in operations.items():
                if open_reads and method == "get" and "security" in operation:
                    operation["security"] = [{}, *operation["security"]]
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code.startswith("4") and "text/event-stream" in content:
                        response["content"] = {"application/json": content["text/event-stream"]}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to shape the spec


def _finite(value: Any) -> Any:
    """`value` with each NaN or infinity as the text it was sent as.

    Python's json reads `NaN` and `Infinity` in a body, and an error echoes the
    input; strict JSON has no such numbers, so the answer could not be written.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _methods_for(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and isinstance(route, BaseRoute) and hasattr(route, "methods"):
            methods.update(route.methods or ())
    return sorted(methods)
