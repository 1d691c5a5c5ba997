"""`freshpool usage` and `freshpool tco`: node-hours and cost from the store's history."""

from __future__ import annotations

import csv
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.table import Table

from freshpool.cli.app import ConfigOpt, JsonOpt, app, friendly, opened, out
from freshpool.core.errors import BadInput

if TYPE_CHECKING:
    from freshpool.usage import Group, UsageRow

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}

SinceOpt = Annotated[
    str,
    typer.Option(
        "--since", help="Start: an age (30m, 12h, 7d), a date (2026-12-01) or epoch seconds."
    ),
]


def parse_since(text: str, now: float) -> float:
    """`--since` as seconds since the epoch; BadInput naming what was given otherwise."""
    ago = _AGO.match(text)
    if ago:
        return now - float(ago.group(1)) * _UNIT[ago.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(
            f"--since {text!r}: expected an age like 7d or 12h, a date like 2026-12-01,"
            " or seconds since the epoch"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _cost(value: float | None) -> str:
    # Unknown is never shown as zero: a missing price would read as free.
    return "unknown" if value is None else f"{value:.2f}"


def _name(group: str, by: str) -> str:
    return group or ("(pool)" if by == "tenant" else "(unknown)")


@app.command()
@friendly
def usage(
    since: SinceOpt = "30d",
    by: Annotated[str, typer.Option("--by", help="Group by tenant, label or provider.")] = "tenant",
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    config_path: ConfigOpt = None,
) -> None:
    """Node-hours and cost by tenant, label or provider: idle (ready), in use, overhead
    (building, testing, deleting). Prices come from cost-per-hour in the config."""
    from freshpool import usage as accounting
    from freshpool.config.pricing import Prices

    if by not in ("tenant", "label", "provider"):
        raise BadInput(f"--by {by!r}: expected tenant, label or provider")
    grouped = cast("Group", by)
    now = time.time()
    start = parse_since(since, now)
    with opened(config_path) as (config, store):
        found = accounting.node_spans(store, start, now)
        report = accounting.report(found, Prices(config), start, now, by=grouped)
    if as_json:
        out.print_json(report.model_dump_json())
    elif as_csv:
        _csv([*report.rows, report.total], by)
    else:
        _table(report.rows, report.total, by)


def _csv(rows: list[UsageRow], by: str) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow([by, "node_hours", "idle_hours", "in_use_hours", "overhead_hours", "cost"])
    for i, row in enumerate(rows):
        name = "(total)" if i == len(rows) - 1 else _name(row.group, by)
        hours = [f"{row.hours[k]:.4f}" for k in ("idle", "in-use", "overhead")]
        writer.writerow([name, f"{row.node_hours:.4f}", *hours, _cost(row.cost)])


def _table(rows: list[UsageRow], total: UsageRow, by: str) -> None:
    table = Table(by, "node-hours", "idle", "in use", "overhead", "cost")
    for column in table.columns[1:]:
        column.justify = "right"
    for row in [*rows, total]:
        name = "total" if row is total else _name(row.group, by)
        hours = [f"{row.hours[k]:.1f}" for k in ("idle", "in-use", "overhead")]
        table.add_row(name, f"{row.node_hours:.1f}", *hours, _cost(row.cost))
    out.print(table)


@app.command()
@friendly
def tco(
    host_cost: Annotated[
        float, typer.Option("--host-cost", min=0, help="What one owned host costs a month.")
    ],
    host_capacity: Annotated[
        int, typer.Option("--host-capacity", min=1, help="Nodes one owned host runs at once.")
    ],
    days: Annotated[float, typer.Option(min=0.01, help="The window, up to now.")] = 30.0,
    as_json: JsonOpt = False,
    config_path: ConfigOpt = None,
) -> None:
    """What the last DAYS of nodes cost as run, would have cost on each configured
    provider, and on owned hosts enough for the peak."""
    from freshpool import usage as accounting
    from freshpool.config.pricing import Prices

    now = time.time()
    window = (now - days * 86400, now)
    with opened(config_path) as (config, store):
        found = accounting.node_spans(store, *window)
        report = accounting.tco(found, config, Prices(config), window, host_cost, host_capacity)
    if as_json:
        out.print_json(report.model_dump_json())
        return
    out.print(
        f"last {days:g} days: {report.node_hours:.1f} node-hours, at most"
        f" {report.peak_nodes} nodes at once",
        highlight=False,
    )
    table = Table("where", "cost", "note")
    table.columns[1].justify = "right"
    for option in report.options:
        table.add_row(option.name, _cost(option.cost), option.note)
    out.print(table)
