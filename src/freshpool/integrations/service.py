"""The HTTP face of a long-running integration process (`freshpool github serve`):
/metrics for Prometheus and /status for people, beside any
route the integration adds (GitHub's webhook)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def integration_app(name: str, status: Callable[[], dict[str, Any]]) -> FastAPI:
    """An app with GET /metrics (the default registry: the integration's counters) and
    GET /status (`status()`: the CI server's health, agents running, orphans removed)."""
    app = FastAPI(title=f"freshpool {name} integration", docs_url=None, redoc_url=None)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    def current() -> dict[str, Any]:
        return {"integration": name, **status()}

    return app
