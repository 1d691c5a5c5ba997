"""`freshpool serve`: the launcher process."""

from __future__ import annotations

import os
import signal
import threading
from typing import Annotated, Any

import typer

from freshpool.cli.app import ConfigOpt, Exit, app, checked_drivers, err, friendly


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
    from freshpool import launcher, launcherlock, logs, serve
    from freshpool.config import load, resolve_path
    from freshpool.drivers.host import cgroups
    from freshpool.store import Store

    config = load(config_path)
    logs.setup(config.log_level)
    if os.geteuid() != 0:
        raise Exit(
            "`freshpool serve` must run as root: local nodes need mounts and network namespaces", 3
        )
    # Inherited by the API process; nodes take a higher score, so they go first.
    cgroups.set_own_oom_score()
    with launcherlock.holding(config.state_dir, launcherlock.SERVE):
        store = Store.open(config.state_dir, config.database_url)
        try:
            drivers = checked_drivers(config, store)
            stop = _stop_on_signals()
            source, _ = resolve_path(config_path)
            err.print(
                f"freshpool serving from {source}; state in {config.state_dir};"
                f" cluster {store.cluster_id}"
            )
            runner = launcher.build(config, store, drivers, automatic_builds=build)
            # The request scheduler and the HTTP API, in a process of their own.
            running = serve.start(config, runner)
            if running.url:
                err.print(f"API and dashboard at {running.url} (OpenAPI: {running.url}/docs)")
            if config.api.enabled and config.api.insecure and not config.api.loopback:
                err.print(
                    f"[bold red]WARNING: the API serves plain HTTP on {config.api.listen}"
                    " (api.insecure: true): API tokens and node access cross the network"
                    " unencrypted. Set api.tls to serve HTTPS.[/]"
                )
            try:
                runner.run(stop)
            finally:
                running.stop()
        finally:
            store.close()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        err.print(f"received {signal.Signals(signum).name}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
