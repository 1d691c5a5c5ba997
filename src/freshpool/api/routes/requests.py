"""/requests: ask for a node set, wait for it (long-poll or server-sent events), cancel, release.

No `from __future__ import annotations` here: the request body's model is made per
app (its labels are the configured ones, so /docs lists them) and FastAPI must see
the real class in each handler's signature.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import Field, create_model

from freshpool.api.auth import Caller, Reader, Svc, Writer
from freshpool.api.models import (
    ErrorOut,
    In,
    NodeOut,
    Number,
    RequestOut,
    SshPublicKey,
    TenantName,
)
from freshpool.api.routes.nodes import MAX_ID, out
from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.api.services import Services
from freshpool.core.errors import NotFound
from freshpool.core.sshkeys import MAX_KEYS
from freshpool.core.states import RequestState
from freshpool.store import NewRequest, RequestRow

RequestId = Annotated[int, Path(ge=1, le=MAX_ID, description="A request id.")]
Wait = Annotated[
    float,
    Query(
        ge=0,
        le=3600,
        description="Seconds to hold the call open until the request is no longer pending"
        " (long-poll); the server may cap it.",
    ),
]
_ERRORS = {
    400: {"model": ErrorOut, "description": "The body is not JSON."},
    401: {"model": ErrorOut, "description": "No token, or an unknown one."},
    403: {"model": ErrorOut, "description": "Not allowed for this token's tenant."},
    404: {"model": ErrorOut, "description": "No such request (or not yours)."},
    409: {"model": ErrorOut, "description": "The request's state does not allow it."},
    503: {
        "model": ErrorOut,
        "description": "The state store failed (locked, full, unreachable); nothing changed,"
        " try again.",
    },
}


def request_model(labels: list[str], most: int) -> type[In]:
    """The body of POST /requests; at most `most` nodes (the largest provider's max-nodes)."""
    label = Literal[tuple(labels)]  # type: ignore[valid-type]  # the labels come from the config
    return create_model(
        "RequestIn",
        __base__=In,
        __doc__="A node set to hand over all at once, from one provider.",
        labels=(
            list[label],  # type: ignore[valid-type]  # the same run-time Literal
            Field(min_length=1, max_length=most, examples=[[labels[0]]]),
        ),
        requestor=(str, Field("", max_length=256, description="Who asks (a CI job URL...).")),
        tenant=(
            TenantName | None,
            Field(None, description="Only admin tokens may ask for another tenant."),
        ),
        priority=(
            Annotated[int, Number],
            Field(0, ge=-1000, le=1000, description="Higher is served first."),
        ),
        ssh_keys=(
            list[SshPublicKey],
            Field(
                [],
                max_length=MAX_KEYS,
                description="The job's SSH public keys: each node of the set lets them log"
                " in as its user from the hand-out on (they are never in the image).",
            ),
        ),
        timeout=(
            Annotated[float, Field(gt=0, le=7 * 86400), Number] | None,
            Field(
                None,
                description="Seconds until the request fails if still unfulfilled"
                " (default: the server's request-timeout).",
            ),
        ),
    )


def visible_request(svc: Services, who: Caller, request_id: int) -> RequestRow:
    request = svc.store.request(request_id)
    if not who.sees(request.tenant):
        raise NotFound(f"no request {request_id}")
    return request


def request_out(svc: Services, who: Caller, request: RequestRow) -> RequestOut:
    nodes = svc.store.request_nodes([request.id])[request.id]
    return RequestOut.of(request, [out(who, n) for n in nodes])


async def wait_for(svc: Services, request_id: int, seconds: float) -> RequestRow:
    """The request once it is no longer pending, or as it is after `seconds`."""
    seconds = min(seconds, svc.max_wait)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    changed = svc.waiters.watch(request_id)
    try:
        while True:
            # Clear before reading, so a change between the read and the wait is not lost.
            changed.clear()
            # Reads run on the event loop: a WAL read never waits for the write lock,
            # and a hop to a worker thread costs more than the read.
            row = svc.store.request(request_id)
            left = give_up - loop.time()
            if row.state != RequestState.PENDING or left <= 0:
                return row
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
    finally:
        svc.waiters.unwatch(request_id, changed)


class Asked(Protocol):
    """POST /requests' body (its model is made per app, see request_model)."""

    labels: list[str]
    requestor: str
    tenant: str | None
    priority: int
    ssh_keys: list[str]
    timeout: float | None


async def create_request(svc: Services, who: Caller, body: Asked, wait: float) -> Response:
    tenant = body.tenant or who.tenant
    if tenant != who.tenant and not who.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this token is tenant {who.tenant!r}; only an admin token may ask for {tenant!r}",
        )
    problems = svc.check_set(tuple(body.labels), svc.config.tenant_quota(tenant))
    if problems:
        raise HTTPException(
            422,
            [
                {"loc": ["body", *p.where], "msg": p.message, "type": "value_error"}
                for p in problems
            ],
        )
    # The scheduler stores it with its next pass and, when the pool has the set
    # ready, hands it over in the same transaction (and wakes the launcher if not).
    seconds = body.timeout if body.timeout is not None else svc.config.request_timeout
    ask = NewRequest(
        tuple(body.labels),
        requestor=body.requestor,
        tenant=tenant or "",
        priority=body.priority,
        deadline=time.time() + seconds,
        ssh_keys=tuple(body.ssh_keys),
    )
    row, nodes = await svc.scheduler.submit(ask)
    if wait > 0 and row.state == RequestState.PENDING:
        row = await wait_for(svc, row.id, wait)
        answer = request_out(svc, who, row)
    else:
        answer = RequestOut.of(row, [out(who, n) for n in nodes])
    # The model is built by us and serialised once by pydantic; FastAPI would
    # validate it again against the response model, the dearest step of a call.
    return Response(
        answer.model_dump_json(),
        status_code=status.HTTP_201_CREATED,
        media_type="application/json",
        headers={"Location": f"/requests/{row.id}"},
    )


def streamed_request(svc: Svc, who: Reader, request_id: RequestId) -> RequestRow:
    # Checked before the stream starts, so a missing request is a 404, not a broken stream.
    return visible_request(svc, who, request_id)


_ROUTER = {
    "prefix": "/requests",
    "tags": ["requests"],
    "responses": _ERRORS,
    "route_class": QueryCheckedRoute,
}
router = APIRouter(**_ROUTER)  # type: ignore[arg-type]  # the keywords are APIRouter's own


def create_router(labels: list[str], most: int) -> APIRouter:
    """POST /requests, whose body lists the configured labels (so /docs shows them)."""
    RequestIn = request_model(labels, most)
    api = APIRouter(**_ROUTER)  # type: ignore[arg-type]  # the keywords are APIRouter's own

    async def create(request: Request, who: Writer, body: RequestIn, wait: Wait = 0) -> Response:  # type: ignore[valid-type]  # a model made at run time
        # Services straight from the app, not as a dependency: FastAPI's per-call
        # cost grows with each dependency.
        return await create_request(request.app.state.services, who, body, wait)

    api.add_api_route(
        "",
        create,
        methods=["POST"],
        status_code=status.HTTP_201_CREATED,
        response_model=RequestOut,
        summary="Ask for a node set",
        description="Queues the request and, with `wait`, holds the call until it is"
        " fulfilled or failed (or `wait` runs out; then it is still pending).",
    )
    return api


@router.get("", summary="List requests, newest first")
def list_requests(
    svc: Svc,
    who: Reader,
    state: Annotated[RequestState | None, Query()] = None,
    tenant: Annotated[TenantName | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RequestOut]:
    if who.tenant is not None and not who.admin:
        if tenant not in (None, who.tenant):
            return []
        tenant = who.tenant
    rows = svc.store.list_requests(states_in=[state] if state else None, tenant=tenant, limit=limit)
    nodes = svc.store.request_nodes([r.id for r in rows])
    return [RequestOut.of(r, [out(who, n) for n in nodes[r.id]]) for r in rows]


@router.get(
    "/{request_id}",
    summary="One request; with `wait`, a long-poll until it is no longer pending",
)
async def get(svc: Svc, who: Reader, request_id: RequestId, wait: Wait = 0) -> RequestOut:
    row = visible_request(svc, who, request_id)
    if wait > 0 and row.state == RequestState.PENDING:
        row = await wait_for(svc, request_id, wait)
    return request_out(svc, who, row)


@router.get(
    "/{request_id}/events",
    response_class=EventSourceResponse,
    summary="Server-sent events: the request now, then each change until it is settled",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    svc: Svc,
    who: Reader,
    row: Annotated[RequestRow, Depends(streamed_request)],
    timeout: Annotated[
        float, Query(ge=0, le=86400, description="Seconds before the stream ends anyway.")
    ] = 300,
) -> AsyncIterator[ServerSentEvent]:
    request_id = row.id
    give_up = time.monotonic() + min(timeout, svc.max_stream)
    last = None
    while True:
        if (row.state, row.state_at) != last:
            last = (row.state, row.state_at)
            body = request_out(svc, who, row)
            yield ServerSentEvent(data=body.model_dump(), event=row.state, id=str(row.state_at))
        left = give_up - time.monotonic()
        if row.state != RequestState.PENDING or left <= 0:
            return
        row = await wait_for(svc, request_id, left)


@router.delete(
    "/{request_id}",
    summary="Cancel a request",
    description="A pending request is cancelled; nodes already handed to it are deleted"
    " (they never go back to ready).",
)
def cancel(svc: Svc, who: Writer, request_id: RequestId) -> RequestOut:
    request = visible_request(svc, who, request_id)
    if not who.owns(request.tenant):
        raise NotFound(f"no request {request_id}")
    why = f"request {request_id} cancelled" + (f" by {who.tenant}" if who.tenant else "")
    row, deleted = svc.store.cancel_request(request_id, why)
    svc.waiters.notify([request_id])
    svc.wake()
    nodes = svc.store.request_nodes([request_id])[request_id]
    return RequestOut.of(row, [out(who, n) for n in nodes] or [out(who, n) for n in deleted])


@router.post("/{request_id}/release", summary="The job ended: release all the request's nodes")
def release(svc: Svc, who: Writer, request_id: RequestId) -> list[NodeOut]:
    request = visible_request(svc, who, request_id)
    if not who.owns(request.tenant):
        raise NotFound(f"no request {request_id}")
    released = svc.store.release_request(request_id, f"released by {who.tenant}")
    svc.wake()
    return [out(who, n) for n in released]
