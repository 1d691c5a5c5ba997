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
    """How this host would enforce each local provider's node limits, or why it cannot."""
    from freshpool.drivers.base import DriverUnavailable
    from freshpool.drivers.host import cgroups
    from freshpool.drivers.local.limits import NodeLimiter

    for provider in config.providers:
        if provider.driver != "local":
            continue
        limiter = NodeLimiter(cgroups.detect(provider.name))
        out.print(f"provider {provider.name}: node limits by {limiter.describe()}", highlight=False)
        for label in config.labels:
            if provider.serves(label.name):
                try:
                    limiter.check(label.limits.over(provider.limits), f"label {label.name}")
                except DriverUnavailable as exc:
                    err.print(f"warning: provider {provider.name}: {exc}", highlight=False)


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    from freshpool.config import default_text

    sys.stdout.write(default_text())
