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


@config_app.command("reload")
@friendly
def config_reload(config_path: ConfigOpt = None) -> None:
    """Check the config file, then have the running `serve` take it (as SIGHUP does):
    it reads the file it was started with, and says whether it took it."""
    import json
    import os
    import signal
    import time

    from freshpool import launcherlock
    from freshpool.config import load
    from freshpool.serve.reload import RESULT_FILE

    config = load(config_path)
    held = launcherlock.holder(config.state_dir)
    if held is None or not launcherlock.serve_runs(config.state_dir):
        raise Exit(f"no `freshpool serve` runs on {config.state_dir}", 1)
    result = config.state_dir / RESULT_FILE
    asked = time.time()
    os.kill(int(held.split()[1]), signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if result.exists() and result.stat().st_mtime >= asked - 1:
            answer = json.loads(result.read_text())
            if answer.get("at", 0) >= asked:
                if not answer["ok"] and not answer["message"].startswith("unchanged"):
                    raise Exit(f"serve: {answer['message']}", 1)
                out.print(f"serve: {answer['message']}", highlight=False)
                return
        time.sleep(0.1)
    raise Exit("serve did not answer within 60 s; see its log", 1)


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    from freshpool.config import default_text

    sys.stdout.write(default_text())
