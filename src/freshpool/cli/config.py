"""`freshpool config ...`: validate and print configuration."""

from __future__ import annotations

import sys

from freshpool.cli.app import (
    ConfigOpt,
    config_app,
    friendly,
    out,
)


@config_app.command("validate")
@friendly
def config_validate(config_path: ConfigOpt = None) -> None:
    """Check the config file; print every problem with its line and key path."""
    from freshpool.config import load, resolve_path

    source, _ = resolve_path(config_path)
    config = load(config_path)
    out.print(
        f"{source}: ok ({len(config.providers)} providers, {len(config.labels)} labels, "
        f"{len(config.images)} images)",
        highlight=False,
    )


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    from freshpool.config import default_text

    sys.stdout.write(default_text())
