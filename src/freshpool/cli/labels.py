"""`freshpool labels`: each label's warm pool, and with --why how an auto label's
target was chosen (the demand controller's last decision and its recent changes)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from freshpool.cli.app import ConfigOpt, JsonOpt, app, friendly, opened, out, short_age

if TYPE_CHECKING:
    from freshpool.config import Label
    from freshpool.store import Store, TargetRow

# Target changes --why shows per label, newest first.
HISTORY_SHOWN = 5


def _setting(label: Label) -> str:
    auto = label.auto
    if auto is None:
        return str(label.min_ready)
    return f"auto {auto.min}-{auto.max}, {auto.service_level:.0%} within {auto.target_wait:g} s"


def _rows(labels: list[Label], store: Store) -> list[dict[str, Any]]:
    counts: dict[str, Counter[str]] = {}
    for (_provider, name, state), n in store.node_counts().items():
        counts.setdefault(name, Counter())[state] += n
    waiting = store.pending_demand()
    targets = store.latest_targets()
    rows = []
    for label in labels:
        c = counts.get(label.name, Counter())
        latest = targets.get(label.name) if label.auto else None
        rows.append(
            {
                "name": label.name,
                "min_ready": _setting(label),
                "target": latest.target if latest else label.ready_floor,
                "ready": c["ready"],
                "building": c["building"] + c["testing"],
                "in_use": c["in-use"],
                "waiting": waiting.get(label.name, 0),
                "auto": label.auto is not None,
            }
        )
    return rows


def _why(label: Label, history: list[TargetRow]) -> list[str]:
    if label.auto is None:
        return [f"{label.name}: fixed min-ready {label.min_ready}"]
    if not history:
        return [f"{label.name}: no target chosen yet; the launcher keeps min {label.auto.min}"]
    now = time.time()
    latest = history[0]
    lines = [
        f"{label.name}: target {latest.target} ({_setting(label)})",
        f"  forecast {latest.rate * 3600:.1f} requests/h;"
        f" launch time assumed {latest.launch_time:.0f} s",
        f"  why: {latest.why}",
        "  changes:",
    ]
    for row in history[:HISTORY_SHOWN]:
        before = "-" if row.previous is None else str(row.previous)
        lines.append(f"    {short_age(now - row.at):>6} ago  {before} -> {row.target}")
    return lines


@app.command()
@friendly
def labels(
    why: Annotated[
        bool, typer.Option("--why", help="How each auto label's target was chosen.")
    ] = False,
    as_json: JsonOpt = False,
    config_path: ConfigOpt = None,
) -> None:
    """Each label's warm pool: min-ready (fixed or auto), its target, nodes by state."""
    with opened(config_path) as (config, store):
        rows = _rows(list(config.labels), store)
        histories = {
            label.name: store.target_history(label.name, HISTORY_SHOWN)
            for label in config.labels
            if why and label.auto
        }
    if as_json:
        for row in rows:
            if why and row["auto"]:
                row["why"] = [vars(r) for r in histories[row["name"]]]
        out.print_json(json.dumps(rows))
        return
    table = Table(
        "LABEL", "MIN-READY", "TARGET", "READY", "BUILDING", "IN USE", "WAITING",
        box=None, header_style="bold",
    )  # fmt: skip
    for row in rows:
        table.add_row(
            row["name"], row["min_ready"], str(row["target"]), str(row["ready"]),
            str(row["building"]), str(row["in_use"]), str(row["waiting"]),
        )  # fmt: skip
    out.print(table)
    if why:
        for label in config.labels:
            for line in _why(label, histories.get(label.name, [])):
                out.print(line, highlight=False, soft_wrap=True)
