"""The state store (SQLAlchemy; SQLite by default). One class made of one mixin per table group."""

from freshpool.store.base import ChangeWatcher, NotFound, StaleState
from freshpool.store.builds import BuildQueries, BuildRow
from freshpool.store.nodes import EventRow, NodeQueries, NodeRow
from freshpool.store.requests import RequestQueries, RequestRow


class Store(NodeQueries, RequestQueries, BuildQueries):
    """Every query freshpool makes; changes are compare-and-set against states.py."""


__all__ = [
    "BuildRow",
    "ChangeWatcher",
    "EventRow",
    "NodeRow",
    "NotFound",
    "RequestRow",
    "StaleState",
    "Store",
]
