"""`freshpool config ...`: validate and print configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from freshpool import launcherlock
    from freshpool.config import load
    from freshpool.serve.apionly import RELOAD_FILE
    from freshpool.serve.reload import RESULT_FILE

    config = load(config_path)
    # serve, and serve --api-only, on this state directory: each reloads on its own.
    running = []
    if launcherlock.serve_runs(config.state_dir):
        running.append(("serve", launcherlock.holder(config.state_dir), RESULT_FILE))
    api = launcherlock.holder(config.state_dir, launcherlock.API_LOCK_FILE)
    if api is not None:
        running.append(("serve --api-only", api, RELOAD_FILE))
    if not running:
        raise Exit(f"no `freshpool serve` runs on {config.state_dir}", 1)
    refused = []
    for name, held, result_file in running:
        answer = _reload_one(config.state_dir / result_file, int(str(held).split()[1]))
        if answer is None:
            raise Exit(f"{name} did not answer within 60 s; see its log", 1)
        if not answer["ok"] and not answer["message"].startswith("unchanged"):
            refused.append(f"{name}: {answer['message']}")
        else:
            out.print(f"{name}: {answer['message']}", highlight=False)
    if refused:
        raise Exit("\n".join(refused), 1)


def _reload_one(result: Path, pid: int) -> dict[str, Any] | None:
    """SIGHUP `pid` and wait for its answer in `result` (None: none within 60 s)."""
    import json
    import os
    import signal
    import time

    asked = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if result.exists() and result.stat().st_mtime >= asked - 1:
            answer = json.loads(result.read_text())
            if answer.get("at", 0) >= asked:
                return dict(answer)
        time.sleep(0.1)
    return None


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    from freshpool.config import default_text

    sys.stdout.write(default_text())
