"""/usage and /usage/tco: node-hours and cost from the store's history (freshpool/usage.py)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from freshpool import usage
from freshpool.api.auth import Caller, Reader, Svc
from freshpool.api.models import ErrorOut
from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.api.services import Services
from freshpool.config.pricing import Prices
from freshpool.core.usage import DAY

router = APIRouter(
    route_class=QueryCheckedRoute,
    tags=["usage"],
    responses={401: {"model": ErrorOut, "description": "Status is closed: send a token."}},
)
# Seconds since the epoch, up to the year 3000: past that is a typo, not a question.
Epoch = Annotated[float, Query(ge=0, le=32_503_680_000)]
Days = Annotated[
    float, Query(gt=0, le=3660, description="The window: this many days up to `until`.")
]


def _window(since: float | None, until: float | None, days: float) -> tuple[float, float]:
    end = time.time() if until is None else until
    return (end - days * DAY if since is None else since), end


def _report(
    svc: Services, who: Caller, window: tuple[float, float], by: usage.Group
) -> usage.UsageReport:
    found = usage.node_spans(svc.store, *window, sees=who.sees)
    return usage.report(found, Prices(svc.config), *window, by=by)


@router.get("/usage", summary="Node-hours and cost by tenant, label or provider, and per day")
async def get_usage(
    svc: Svc,
    who: Reader,
    since: Annotated[
        Epoch | None, Query(description="Start (default: `days` before until).")
    ] = None,
    until: Annotated[Epoch | None, Query(description="End (default: now).")] = None,
    days: Days = 30,
    by: usage.Group = "tenant",
) -> usage.UsageReport:
    return await run_in_threadpool(_report, svc, who, _window(since, until, days), by)


def _tco(
    svc: Services, who: Caller, window: tuple[float, float], cost: float, capacity: int
) -> usage.TcoReport:
    found = usage.node_spans(svc.store, *window, sees=who.sees)
    return usage.tco(found, svc.config, Prices(svc.config), window, cost, capacity)


@router.get(
    "/usage/tco",
    summary="What the window's node-hours cost as run, on each provider, and on owned hosts",
)
async def get_tco(
    svc: Svc,
    who: Reader,
    host_monthly_cost: Annotated[
        float, Query(ge=0, le=1e12, description="What one owned host costs a month (30 days).")
    ],
    host_capacity: Annotated[
        int, Query(ge=1, le=1_000_000, description="How many nodes one owned host runs at once.")
    ],
    until: Annotated[Epoch | None, Query(description="End (default: now).")] = None,
    days: Days = 30,
) -> usage.TcoReport:
    window = _window(None, until, days)
    return await run_in_threadpool(_tco, svc, who, window, host_monthly_cost, host_capacity)
