"""`freshpool import ...`: another node pool's config as a freshpool one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from freshpool.cli.app import Exit, app, err, friendly, group

import_app = group("Turn another node pool's config into a freshpool one.")
app.add_typer(import_app, name="import")


@import_app.command("nodepool")
@friendly
def import_nodepool(
    source: Annotated[Path, typer.Argument(help="Nodepool's config (nodepool.yaml).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write here (default: standard output).")
    ] = None,
) -> None:
    """Labels, OpenStack and AWS providers and their pools, and diskimages; what does
    not map is listed at the top as TODOs with the nodepool.yaml line."""
    from ruamel.yaml.error import YAMLError

    from freshpool.config import ConfigError, parse
    from freshpool.importer.nodepool import convert

    try:
        imported = convert(source.read_text())
    except OSError as exc:
        raise Exit(f"cannot read {source}: {exc.strerror}", 2) from None
    except (AttributeError, KeyError, TypeError, ValueError, YAMLError) as exc:
        what = f"{source}: not a Nodepool config this importer understands: {exc}"
        raise Exit(what, 2) from None
    text = imported.text()
    try:
        parse(text, str(out or "imported.yaml"))
    except ConfigError as exc:  # a bug here, not in the input: say so, keep the output
        err.print(f"warning: the imported config does not validate:\n{exc}", highlight=False)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err.print(f"wrote {out}; {len(imported.todos)} TODOs at its top", highlight=False)
