"""`freshpool serve`: the launcher process."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from freshpool import logs
from freshpool.cli.app import (
    ConfigOpt,
    Exit,
    app,
    err,
    friendly,
)
from freshpool.config import load, resolve_path
from freshpool.drivers.base import Driver, load_driver
from freshpool.service.imagekeeper import ImageKeeper
from freshpool.store import Store

# ---------------------------------------------------------------- serving


@app.command()
@friendly
def serve(
    config_path: ConfigOpt = None,
    build: Annotated[
        bool,
        typer.Option(
            help="Build images on their own (none ready, definition changed, rebuild-age);"
            " with --no-build only `freshpool image build` requests are built."
        ),
    ] = True,
) -> None:
    """Run the launcher: keep min-ready nodes per label ready, delete used ones."""
    from freshpool.api import serving
    from freshpool.api.server import ListenError
    from freshpool.service.launcher import Launcher

    config = load(config_path)
    logs.setup(config.log_level)
    if os.geteuid() != 0:
        raise Exit(
            "`freshpool serve` must run as root: local nodes need mounts and network namespaces", 3
        )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = _launcher_lock(config.state_dir)
    store = Store.open(config.state_dir, config.database_url)
    drivers: dict[str, Driver] = {}
    for provider in config.providers:
        driver = load_driver(provider, store.cluster_id, config.state_dir)
        driver.check()
        drivers[provider.name] = driver
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        err.print(f"received {signal.Signals(signum).name}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    source, _ = resolve_path(config_path)
    err.print(
        f"freshpool serving from {source}; state in {config.state_dir}; cluster {store.cluster_id}"
    )
    launcher = Launcher(config, store, drivers)
    try:
        # The request scheduler, metrics and the HTTP API (api: in the config), in a
        # process of their own.
        running = serving.start(config, launcher)
    except (ListenError, serving.StartError) as exc:
        store.close()
        raise Exit(str(exc), 3) from None
    if running.url:
        err.print(f"API and dashboard at {running.url} (OpenAPI: {running.url}/docs)")
    # Builds, validates, uploads and deletes image builds, once per launcher pass.
    keeper = ImageKeeper(config, store, drivers, automatic=build, wake=launcher.wake)
    launcher.add_pass(keeper.tick)
    try:
        launcher.run(stop)
    finally:
        keeper.stop()
        running.stop()
        store.close()
        lock.close()


def _launcher_lock(state_dir: Path) -> Any:
    """One launcher per state directory; a second one says who holds it."""
    handle = open(state_dir / "launcher.lock", "a+")  # noqa: SIM115 - held for the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise Exit(f"another `freshpool serve` ({holder}) already runs on {state_dir}", 1) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
