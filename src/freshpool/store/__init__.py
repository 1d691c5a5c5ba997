"""The state store (SQLAlchemy; SQLite by default). One class made of one mixin per table group."""

from freshpool.store.base import ChangeWatcher, NotFound, StaleState
from freshpool.store.builds import BuildQueries, BuildRow
from freshpool.store.history import HistoryEvent, HistoryQueries
from freshpool.store.nodes import EventRow, NodeQueries, NodeRow
from freshpool.store.requests import RequestQueries, RequestRow
from freshpool.store.scheduling import SchedulingQueries
from freshpool.store.tokens import TokenQueries, TokenRow
from freshpool.store.uploads import UploadQueries, UploadRow


class Store(
    NodeQueries,
    RequestQueries,
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
    "HistoryEvent",
    "NodeRow",
    "NotFound",
    "RequestRow",
    "StaleState",
    "Store",
    "TokenRow",
    "UploadRow",
]
