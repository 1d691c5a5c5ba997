"""The dashboard: its page at /, and /status, one document with everything it shows."""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from freshpool.api.auth import Caller, Reader, Svc
from freshpool.api.models import (
    ErrorOut,
    LauncherOut,
    LeaseOut,
    QueueEntry,
    RequestOut,
    Status,
)
from freshpool.api.routes.nodes import out
from freshpool.api.routes.pool import build_list, label_summaries
from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.api.services import Services
from freshpool.core.fleet import FORGET_TTLS
from freshpool.core.states import RequestState

router = APIRouter(tags=["dashboard"], route_class=QueryCheckedRoute)
QUEUE_SHOWN = 100
RECENT_SHOWN = 20
NODES_SHOWN = 500


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    html = resources.files("freshpool.api").joinpath("static/index.html").read_text()
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


def snapshot(svc: Services, who: Caller, version: int) -> Status:
    queue = [r for r in svc.scheduler.queue() if who.sees(r.tenant)][:QUEUE_SHOWN]
    recent = [
        r
        for r in svc.store.list_requests(limit=RECENT_SHOWN * 5)
        if r.state != RequestState.PENDING and who.sees(r.tenant)
    ][:RECENT_SHOWN]
    nodes = [n for n in svc.store.nodes() if who.sees(n.tenant)][:NODES_SHOWN]
    held = svc.store.request_nodes([r.id for r in recent])
    return Status(
        now=time.time(),
        version=version,
        ready=svc.scheduler.started.is_set(),
        cluster=svc.store.cluster_id,
        labels=label_summaries(svc),
        nodes=[out(who, n) for n in nodes],
        queue=[
            QueueEntry(**RequestOut.of(r, []).model_dump(), position=i + 1)
            for i, r in enumerate(queue)
        ],
        recent=[RequestOut.of(r, [out(who, n) for n in held[r.id]]) for r in recent],
        builds=build_list(svc, limit=10),
        history=svc.observed.read().history,
        launchers=launchers(svc),
    )


def launchers(svc: Services) -> list[LauncherOut]:
    """Every launcher the database knows, with the leases it holds now; dead ones
    (not seen within a lease TTL) shown as such until FORGET_TTLS have passed."""
    if not svc.store.shared_by_launchers:
        return []
    # Heartbeats and leases are stamped by the database's clock, not this host's.
    now = svc.store.fleet_now()
    ttl = svc.config.lease_ttl
    leases = [lease for lease in svc.store.leases().values() if lease.expires_at > now]
    return [
        LauncherOut(
            id=row.id,
            seen_ago=max(0.0, now - row.seen_at),
            live=now - row.seen_at <= ttl,
            may_drive=row.providers,
            leases=[
                LeaseOut(
                    provider=lease.provider,
                    generation=lease.generation,
                    held_for=max(0.0, now - lease.taken_at),
                    expires_in=lease.expires_at - now,
                )
                for lease in leases
                if lease.owner == row.id
            ],
        )
        for row in svc.store.launcher_rows()
        if now - row.seen_at <= FORGET_TTLS * ttl
    ]


@router.get(
    "/status",
    summary="Everything the dashboard shows; with `since`, a long-poll for the next change",
    responses={401: {"model": ErrorOut, "description": "Status is closed: send a token."}},
)
async def status(
    svc: Svc,
    who: Reader,
    since: Annotated[
        int | None,
        Query(ge=0, le=2**62, description="The `version` last seen: wait until it moves."),
    ] = None,
    wait: Annotated[float, Query(ge=0, le=60, description="Seconds to wait at most.")] = 15,
) -> Status:
    version = svc.changes.version
    if since is not None:
        version = await svc.changes.wait(since, min(wait, svc.max_wait))
    return await run_in_threadpool(snapshot, svc, who, version)
