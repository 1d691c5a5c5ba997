"""The state store (SQLAlchemy; SQLite by default). One class made of one mixin per table group."""

from freshpool.store.base import ChangeWatcher, NotFound, StaleState, WriteBusy
from freshpool.store.builds import BuildQueries, BuildRow
from freshpool.store.handout import (
    HandOut,
    HandOutQueries,
    NewRequest,
    Planner,
    Queue,
    Ready,
    first_fit,
    first_fit_for,
    needs,
)
from freshpool.store.history import HistoryEvent, HistoryQueries, RequestOutcome
from freshpool.store.nodes import EventRow, NodeQueries, NodeRow
from freshpool.store.requests import RequestQueries, RequestRow
from freshpool.store.scheduling import SchedulingQueries
from freshpool.store.tokens import TokenQueries, TokenRow
from freshpool.store.uploads import UploadQueries, UploadRow


class Store(
    NodeQueries,
    RequestQueries,
    HandOutQueries,
    BuildQueries,
    SchedulingQueries,
    HistoryQueries,
    TokenQueries,
    UploadQueries,
):
    """Every query freshpool makes; changes are compare-and-set against states.py."""


__all__ = [
    "BuildRow",
    "ChangeWatcher",
    "EventRow",
    "HandOut",
    "HistoryEvent",
    "NewRequest",
    "NodeRow",
    "NotFound",
    "Planner",
    "Queue",
    "Ready",
    "RequestOutcome",
    "RequestRow",
    "StaleState",
    "Store",
    "TokenRow",
    "UploadRow",
    "WriteBusy",
    "first_fit",
    "first_fit_for",
    "needs",
]
