"""The state store (SQLAlchemy; SQLite by default, PostgreSQL for a fleet): one class
made of one mixin per table group, every change a compare-and-set against
core/states.py."""

from freshpool.core.errors import NotFound, StaleState, WriteBusy
from freshpool.store.builds import BuildInProgress, BuildQueries, BuildRow, ImageRow, ServingBuild
from freshpool.store.changes import ChangeWatcher
from freshpool.store.fencing import Fencing
from freshpool.store.handout import HandOut, HandOutQueries, NewRequest, Planner, Queue, queue_only
from freshpool.store.history import HistoryEvent, HistoryQueries, RequestOutcome
from freshpool.store.leases import LauncherRow, LeaseQueries, LeaseRow
from freshpool.store.nodes import EventRow, Move, NodeQueries, NodeRow
from freshpool.store.requests import RequestQueries, RequestRow
from freshpool.store.room import NewNodes, Room
from freshpool.store.targets import Arrival, TargetQueries, TargetRow
from freshpool.store.tokens import TokenQueries, TokenRow
from freshpool.store.uploads import UploadQueries, UploadRow


class Store(
    NodeQueries,
    RequestQueries,
    HandOutQueries,
    BuildQueries,
    HistoryQueries,
    TargetQueries,
    TokenQueries,
    UploadQueries,
    LeaseQueries,
):
    """Every query freshpool makes."""


__all__ = [
    "Arrival",
    "BuildInProgress",
    "BuildRow",
    "ChangeWatcher",
    "EventRow",
    "Fencing",
    "HandOut",
    "HistoryEvent",
    "ImageRow",
    "LauncherRow",
    "LeaseRow",
    "Move",
    "NewNodes",
    "NewRequest",
    "NodeRow",
    "NotFound",
    "Planner",
    "Queue",
    "RequestOutcome",
    "RequestRow",
    "Room",
    "ServingBuild",
    "StaleState",
    "Store",
    "TargetRow",
    "TokenRow",
    "UploadRow",
    "WriteBusy",
    "queue_only",
]
