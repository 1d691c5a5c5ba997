"""The state tables: the one place that says which state changes are allowed.

Pure data and one check, no I/O. The store enforces these on every change with a
compare-and-set, so a rule written here holds for every code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from freshpool.core.errors import Refused


class NodeState(StrEnum):
    BUILDING = "building"
    TESTING = "testing"
    READY = "ready"
    IN_USE = "in-use"
    USED = "used"
    HOLD = "hold"
    FAILED = "failed"
    DELETING = "deleting"


class RequestState(StrEnum):
    PENDING = "pending"
    FULFILLED = "fulfilled"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BuildState(StrEnum):
    BUILDING = "building"
    VALIDATING = "validating"
    READY = "ready"
    RETIRED = "retired"
    FAILED = "failed"
    DELETED = "deleted"


class UploadState(StrEnum):
    UPLOADING = "uploading"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


N = NodeState
# Single use lives here: only TESTING leads to READY, so a node that has left
# READY (handed out, held, failed) can never be handed out again.
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    N.BUILDING: frozenset({N.TESTING, N.FAILED, N.DELETING}),
    N.TESTING: frozenset({N.READY, N.FAILED, N.DELETING}),
    N.READY: frozenset({N.IN_USE, N.HOLD, N.FAILED, N.DELETING}),
    N.IN_USE: frozenset({N.USED, N.HOLD, N.FAILED, N.DELETING}),
    N.USED: frozenset({N.DELETING}),
    N.HOLD: frozenset({N.USED, N.DELETING}),
    N.FAILED: frozenset({N.DELETING}),
    # A deleting node leaves the store only when the driver confirms it is gone.
    N.DELETING: frozenset(),
}

R = RequestState
REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    R.PENDING: frozenset({R.FULFILLED, R.FAILED, R.CANCELLED}),
    # Cancelling a fulfilled request deletes its nodes (they never return to ready).
    R.FULFILLED: frozenset({R.CANCELLED}),
    R.FAILED: frozenset(),
    R.CANCELLED: frozenset(),
}

B = BuildState
BUILD_TRANSITIONS: dict[BuildState, frozenset[BuildState]] = {
    B.BUILDING: frozenset({B.VALIDATING, B.READY, B.FAILED}),
    B.VALIDATING: frozenset({B.READY, B.FAILED}),
    B.READY: frozenset({B.RETIRED, B.DELETED}),
    B.RETIRED: frozenset({B.READY, B.DELETED}),
    B.FAILED: frozenset({B.DELETED}),
    B.DELETED: frozenset(),
}

U = UploadState
# A row is removed once the provider confirms the upload deleted.
UPLOAD_TRANSITIONS: dict[UploadState, frozenset[UploadState]] = {
    U.UPLOADING: frozenset({U.READY, U.FAILED, U.DELETING}),
    U.READY: frozenset({U.DELETING}),
    U.FAILED: frozenset({U.DELETING}),
    U.DELETING: frozenset(),
}

# States in which a node still occupies provider capacity and is not yet handed out.
NODE_SUPPLY_STATES = frozenset({N.BUILDING, N.TESTING, N.READY})
# States the launcher must turn into a delete.
NODE_TO_DELETE_STATES = frozenset({N.USED, N.FAILED})


class InvalidTransition(Refused):
    """A state change that the state table does not allow."""

    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(f"{kind} may not go from {current!r} to {target!r}")
        self.kind, self.current, self.target = kind, current, target


def check_node(current: NodeState | str, target: NodeState | str) -> None:
    _check("node", NODE_TRANSITIONS, NodeState(current), NodeState(target))


def check_request(current: RequestState | str, target: RequestState | str) -> None:
    _check("request", REQUEST_TRANSITIONS, RequestState(current), RequestState(target))


def check_build(current: BuildState | str, target: BuildState | str) -> None:
    _check("image build", BUILD_TRANSITIONS, BuildState(current), BuildState(target))


def check_upload(current: UploadState | str, target: UploadState | str) -> None:
    _check("image upload", UPLOAD_TRANSITIONS, UploadState(current), UploadState(target))


def _check(
    kind: str, table: Mapping[Any, frozenset[Any]], current: StrEnum, target: StrEnum
) -> None:
    if target not in table[current]:
        raise InvalidTransition(kind, current.value, target.value)
