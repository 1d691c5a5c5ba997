"""`freshpool image ...`: build and list images."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer
from rich.table import Table

from freshpool.cli.app import (
    ConfigOpt,
    Exit,
    JsonOpt,
    err,
    friendly,
    image_app,
    opened,
    out,
    short_age,
)
from freshpool.service import imaging

# ---------------------------------------------------------------- images


@image_app.command("build")
@friendly
def image_build(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    config_path: ConfigOpt = None,
) -> None:
    """Build an image now (debootstrap, packages, pre-fetch) and make it the one served."""
    if os.geteuid() != 0:
        raise Exit("building an image needs root (debootstrap and bubblewrap)", 3)
    with opened(config_path) as (config, store):
        config.image(name)
        started = time.monotonic()
        with err.status(f"building {name}") as status:

            def progress(stage: str, line: str) -> None:
                elapsed = time.monotonic() - started
                status.update(f"[bold]{name}[/] {elapsed:5.0f}s  {stage}: [dim]{line[-70:]}[/]")

            try:
                row = imaging.build(config, store, name, progress)
            except Exception as exc:
                raise Exit(f"image {name}: build failed: {exc}", 1) from None
    size = (row.manifest or {}).get("size_bytes", 0)
    out.print(
        f"image {name}: build {row.id} ready ({size / 1e6:.0f} MB, "
        f"{time.monotonic() - started:.0f} s)",
        highlight=False,
    )


@image_app.command("list")
@friendly
def image_list(as_json: JsonOpt = False, config_path: ConfigOpt = None) -> None:
    """Every image build with its state and age."""
    with opened(config_path) as (_config, store):
        builds = store.builds()
        nodes = store.nodes()
    using: dict[str, int] = {}
    for n in nodes:
        using[n.build_id] = using.get(n.build_id, 0) + 1
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": b.id,
                        "image": b.image,
                        "state": b.state,
                        "path": b.path,
                        "reason": b.reason,
                        "created_at": b.created_at,
                        "nodes": using.get(b.id, 0),
                        "size_bytes": (b.manifest or {}).get("size_bytes"),
                    }
                    for b in builds
                ]
            )
        )
        return
    table = Table(
        "BUILD", "IMAGE", "STATE", "AGE", "SIZE", "NODES", "REASON", box=None, header_style="bold"
    )
    now = time.time()
    for b in builds:
        size = (b.manifest or {}).get("size_bytes")
        table.add_row(
            b.id,
            b.image,
            b.state,
            short_age(now - b.created_at),
            f"{size / 1e6:.0f} MB" if size else "",
            str(using.get(b.id, 0)),
            b.reason[:80],
        )
    out.print(table)
