"""The state store (SQLAlchemy; SQLite by default)."""

from freshpool.store.store import (
    BuildRow,
    EventRow,
    NodeRow,
    NotFound,
    RequestRow,
    StaleState,
    Store,
)

__all__ = ["BuildRow", "EventRow", "NodeRow", "NotFound", "RequestRow", "StaleState", "Store"]
