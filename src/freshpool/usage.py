"""Usage reports from the store's history: node-hours and cost by tenant, label or
provider, per day, and what the same hours would have cost elsewhere (TCO).

The CLI and the API (`GET /usage`, `GET /usage/tco`) both answer with these models.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from freshpool.config import Config
from freshpool.core import usage
from freshpool.core.usage import HOUR, KIND_OF, KINDS, Key, Price, Span
from freshpool.store import Store

Group = Literal["tenant", "label", "provider"]
# What "a month" of an owned host's cost covers.
MONTH = 30 * usage.DAY


class UsageRow(BaseModel):
    group: str = Field(description="The tenant, label or provider ('' : none, e.g. the pool).")
    node_hours: float
    hours: dict[str, float] = Field(description="Node-hours by kind: idle, in-use, overhead.")
    states: dict[str, float] = Field(description="Node-hours by node state.")
    cost: float | None = Field(description="null: some of these hours have no price.")
    unpriced_hours: float


class DayUsage(BaseModel):
    day: float = Field(description="The UTC day's start, seconds since the epoch.")
    tenant: str
    node_hours: float


class UsageReport(BaseModel):
    since: float
    until: float
    by: Group
    rows: list[UsageRow]
    total: UsageRow
    days: list[DayUsage]


class TcoOption(BaseModel):
    name: str
    kind: Literal["as-run", "provider", "owned"]
    cost: float | None = Field(description="null: unknown (a price is missing).")
    note: str = ""


class TcoReport(BaseModel):
    since: float
    until: float
    node_hours: float
    peak_nodes: int
    hosts: int = Field(description="Owned hosts needed for the peak.")
    options: list[TcoOption]


def node_spans(
    store: Store, since: float, until: float, sees: Callable[[str], bool] = lambda _t: True
) -> list[Span]:
    """Every node's time in each state within [since, until), of tenants `sees` allows."""
    found = usage.spans(store.events_during(since, until), until)
    return [s for s in usage.clipped(found, since, until) if sees(s.key.tenant)]


def report(
    found: list[Span], price: Price, since: float, until: float, by: Group = "tenant"
) -> UsageReport:
    grouped: dict[str, list[Span]] = defaultdict(list)
    for span in found:
        grouped[span.key.group(by)].append(span)
    rows = [row(name, usage.node_seconds(spans), price) for name, spans in grouped.items()]
    rows.sort(key=lambda r: (-r.node_hours, r.group))
    days = [
        DayUsage(day=day, tenant=tenant, node_hours=seconds / HOUR)
        for (day, tenant), seconds in sorted(usage.by_day(found, "tenant").items())
    ]
    total = row("", usage.node_seconds(found), price)
    return UsageReport(since=since, until=until, by=by, rows=rows, total=total, days=days)


def row(name: str, seconds: dict[Key, float], price: Price) -> UsageRow:
    hours = dict.fromkeys(KINDS, 0.0)
    states: dict[str, float] = defaultdict(float)
    unpriced = 0.0
    for key, secs in seconds.items():
        hours[KIND_OF.get(key.state, "overhead")] += secs / HOUR
        states[key.state] += secs / HOUR
        if price(key.provider, key.label) is None:
            unpriced += secs / HOUR
    return UsageRow(
        group=name,
        node_hours=sum(seconds.values()) / HOUR,
        hours=hours,
        states=dict(states),
        cost=usage.cost(seconds, price),
        unpriced_hours=unpriced,
    )


def tco(
    found: list[Span],
    config: Config,
    price: Price,
    window: tuple[float, float],
    host_monthly_cost: float,
    host_capacity: int,
) -> TcoReport:
    """What the hours in `found` cost as run, would have cost with every node on each
    configured provider, and on owned hosts enough for the peak."""
    since, until = window
    seconds = usage.node_seconds(found)
    by_label: dict[str, float] = defaultdict(float)
    for key, secs in seconds.items():
        by_label[key.label] += secs
    options = [TcoOption(name="as run", kind="as-run", cost=usage.cost(seconds, price))]
    for provider in config.providers:
        unpriced = sorted(x or "(unknown)" for x in by_label if price(provider.name, x) is None)
        cost = usage.cost(seconds, _all_on(provider.name, price))
        note = f"no price for {', '.join(unpriced)}" if unpriced else ""
        options.append(TcoOption(name=provider.name, kind="provider", cost=cost, note=note))
    peak = usage.peak_nodes(found)
    hosts = math.ceil(peak / host_capacity)
    owned = hosts * host_monthly_cost * (until - since) / MONTH
    note = f"{hosts} host(s) of {host_capacity} nodes for a peak of {peak}"
    options.append(TcoOption(name="owned hosts", kind="owned", cost=owned, note=note))
    return TcoReport(
        since=since,
        until=until,
        node_hours=sum(seconds.values()) / HOUR,
        peak_nodes=peak,
        hosts=hosts,
        options=options,
    )


def _all_on(provider: str, price: Price) -> Price:
    """Prices as if every node had run on `provider`."""
    return lambda _provider, label: price(provider, label)
