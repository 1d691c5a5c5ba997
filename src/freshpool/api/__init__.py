"""The HTTP API (FastAPI), the dashboard and /metrics, served by `freshpool serve`."""
