"""`freshpool config ...`: validate and print configuration."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from freshpool.cli.app import (
    ConfigOpt,
    Exit,
    config_app,
    err,
    friendly,
    out,
)

if TYPE_CHECKING:
    from freshpool.config import Config


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
    _say_limits(config)
    _ask_clouds(config)


def _ask_clouds(config: Config) -> None:
    """Each cloud provider's credentials, images and networks, asked of the cloud."""
    from freshpool.drivers.base import DriverError, driver_class, load_driver

    failed = []
    for provider in config.providers:
        if not driver_class(provider).remote:
            continue
        try:
            load_driver(provider, "validate", config.state_dir).check()
        except DriverError as exc:
            failed.append(str(exc))
            continue
        out.print(f"provider {provider.name}: {provider.driver} answers; settings found")
    if failed:
        raise Exit("\n".join(failed))


def _say_limits(config: Config) -> None:
    from freshpool.doctor import node_limits

    for finding in node_limits(config):
        if finding.ok:
            out.print(f"{finding.what}: {finding.detail}", highlight=False)
        else:
            err.print(f"warning: {finding.what}: {finding.detail}", highlight=False)


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    from freshpool.config import default_text

    sys.stdout.write(default_text())
