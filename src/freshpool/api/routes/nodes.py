"""/nodes: list, show, mark the job started, release (the whole set), hold, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from freshpool.api.auth import Caller, Reader, Svc, Writer
from freshpool.api.models import ErrorOut, EventOut, HoldIn, JobStart, NodeDetail, NodeOut
from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.core.errors import NotFound
from freshpool.core.states import NodeState
from freshpool.store import NodeRow, Store

MAX_ID = 2**63 - 1
NodeId = Annotated[int, Path(ge=1, le=MAX_ID, description="A node id.")]

router = APIRouter(
    route_class=QueryCheckedRoute,
    prefix="/nodes",
    tags=["nodes"],
    responses={
        400: {"model": ErrorOut, "description": "The body is not JSON."},
        401: {"model": ErrorOut, "description": "No token, or an unknown one."},
        404: {"model": ErrorOut, "description": "No such node (or not yours)."},
        409: {"model": ErrorOut, "description": "The node's state does not allow it."},
    },
)


def visible_node(store: Store, who: Caller, node_id: int) -> NodeRow:
    node = store.node(node_id)
    if not who.sees(node.tenant):
        # Another tenant's node is not even confirmed to exist.
        raise NotFound(f"no node {node_id}")
    return node


def owned_node(store: Store, who: Caller, node_id: int) -> NodeRow:
    """A node the caller may act on: its tenant's, or any for an admin tenant's token.

    Nodes not handed out yet belong to no tenant, so only an admin may hold or delete them.
    """
    node = store.node(node_id)
    if not who.owns(node.tenant):
        raise NotFound(f"no node {node_id}")
    return node


def out(who: Caller, node: NodeRow) -> NodeOut:
    return NodeOut.of(node, show_access=who.owns(node.tenant))


@router.get("", summary="List nodes")
def list_nodes(
    svc: Svc,
    who: Reader,
    state: Annotated[NodeState | None, Query(description="Only nodes in this state.")] = None,
    label: Annotated[str | None, Query(max_length=64)] = None,
    provider: Annotated[str | None, Query(max_length=64)] = None,
) -> list[NodeOut]:
    rows = svc.store.nodes(states_in=[state] if state else None, label=label, provider=provider)
    return [out(who, n) for n in rows if who.sees(n.tenant)]


@router.get("/{node_id}", summary="One node, with its history")
def get_node(svc: Svc, who: Reader, node_id: NodeId) -> NodeDetail:
    node = visible_node(svc.store, who, node_id)
    base = out(who, node)
    return NodeDetail(
        **base.model_dump(),
        job_started_at=svc.store.job_started_at(node_id),
        events=[EventOut.of(e) for e in svc.store.events(node_id)],
    )


@router.post(
    "/{node_id}/in-use",
    summary="The job on this node started",
    description="Records when the job started, in the node's history. A node runs one job:"
    " a second call is refused (409).",
)
def job_started(
    svc: Svc, who: Writer, node_id: NodeId, body: Annotated[JobStart | None, Body()] = None
) -> NodeOut:
    owned_node(svc.store, who, node_id)
    return out(who, svc.store.start_job(node_id, body.job if body else ""))


@router.post(
    "/{node_id}/release",
    summary="The job ended: release the node and the rest of its set",
    description="Every in-use node of the node's request becomes `used` together; used nodes"
    " are deleted, never handed out again.",
)
def release(svc: Svc, who: Writer, node_id: NodeId) -> list[NodeOut]:
    owned_node(svc.store, who, node_id)
    released = svc.store.release_set(node_id, f"released by {who.tenant}")
    svc.wake()
    return [out(who, n) for n in released]


@router.post("/{node_id}/hold", summary="Keep a node for a person to debug")
def hold(
    svc: Svc, who: Writer, node_id: NodeId, body: Annotated[HoldIn | None, Body()] = None
) -> NodeOut:
    owned_node(svc.store, who, node_id)
    why = body.reason if body and body.reason else f"held by {who.tenant}"
    return out(who, svc.store.move(node_id, NodeState.HOLD, why))


@router.delete("/{node_id}", summary="Delete a node now")
def delete(svc: Svc, who: Writer, node_id: NodeId) -> NodeOut:
    owned_node(svc.store, who, node_id)
    node = svc.store.move(node_id, NodeState.DELETING, f"deleted by {who.tenant}")
    svc.wake()
    return out(who, node)
