"""The HTTP face of a long-running integration process (`freshpool github serve`):
/metrics for Prometheus and /status for people, beside any
route the integration adds (GitHub's webhook), and the life of the process."""

from __future__ import annotations

import threading
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


def run(app: FastAPI, host: str, port: int, loop: Callable[[threading.Event], None],
        stop: threading.Event, teardown: Callable[[], None]) -> None:  # fmt: skip
    """Serve `app` and run `loop(stop)` beside it until SIGINT/SIGTERM; then `stop` is
    set, the loop given time to finish its pass, and `teardown()` run."""
    import uvicorn

    thread = threading.Thread(target=loop, args=(stop,), daemon=True, name=f"{app.title} loop")
    thread.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run()
    finally:
        stop.set()
        thread.join(timeout=10)
        teardown()
