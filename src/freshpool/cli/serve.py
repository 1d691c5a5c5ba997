"""`freshpool serve`: the launcher process."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from freshpool.cli.app import ConfigOpt, Exit, app, checked_drivers, err, friendly

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from freshpool import serve as serving
    from freshpool.config import Config
    from freshpool.serve.reload import Reloader
    from freshpool.store import Store


ApiOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--api-only",
        help="Serve only the API, the dashboard and the request scheduler against the"
        " fleet's PostgreSQL (database-url), on any host: no launcher, no provider"
        " driven, no root needed.",
    ),
]


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
    api_only: ApiOnlyOpt = False,
) -> None:
    """Run the launcher: keep min-ready nodes per label ready, delete used ones."""
    from freshpool import launcherlock, logs
    from freshpool.config import load, resolve_path
    from freshpool.drivers.host import cgroups
    from freshpool.serve.reload import Reloader, api_unchanged
    from freshpool.store import Store

    config = load(config_path)
    logs.setup(config.log_level)
    if api_only:
        _api_only(config, config_path)
        return
    if os.geteuid() != 0:
        raise Exit(
            "`freshpool serve` must run as root: local nodes need mounts and network namespaces", 3
        )
    # Inherited by the API process; nodes take a higher score, so they go first.
    cgroups.set_own_oom_score()
    with launcherlock.holding(config.state_dir, launcherlock.SERVE):
        store = Store.open(config.state_dir, config.database_url)
        try:
            source, _ = resolve_path(config_path)
            err.print(
                f"freshpool serving from {source}; state in {config.state_dir};"
                f" cluster {store.cluster_id}"
            )
            listener = None
            while True:
                stop = _stop_on_signals()
                reloader = Reloader(config_path, config, stop)
                signal.signal(signal.SIGHUP, _reload_on(reloader))
                try:
                    running = _run(config, store, build, stop, listener, reloader)
                finally:
                    reloader.close()
                new = reloader.next
                keep = new is not None and api_unchanged(config, new)
                listener = running.api.listener if keep else None
                running.stop(keep_listener=keep)
                if new is None:
                    break
                config = new
                logs.setup(config.log_level)
        finally:
            store.close()


def _run(config: Config, store: Store, build: bool, stop: threading.Event,
         listener: socket.socket | None, reloader: Reloader) -> serving.Running:  # fmt: skip
    """One run of the launcher and the API on `config`, until `stop` (or a reload)."""
    from freshpool import launcher
    from freshpool import serve as serving

    drivers = checked_drivers(config, store)
    runner = launcher.build(config, store, drivers, automatic_builds=build)
    if runner.leases is not None:
        runner.leases.keep_on_stop = lambda: reloader.next is not None
    # The request scheduler and the HTTP API, in a process of their own.
    running = serving.start(config, runner, listener=listener)
    if running.url and listener is None:
        err.print(f"API and dashboard at {running.url} (OpenAPI: {running.url}/docs)")
    if config.api.enabled and config.api.insecure and not config.api.loopback:
        err.print(
            f"[bold red]WARNING: the API serves plain HTTP on {config.api.listen}"
            " (api.insecure: true): API tokens and node access cross the network"
            " unencrypted. Set api.tls to serve HTTPS.[/]"
        )
    try:
        runner.run(stop)
    except BaseException:
        running.stop()
        raise
    return running


def _api_only(config: Config, config_path: Path | None) -> None:
    """`serve --api-only`, reloading its config on SIGHUP as serve does."""
    from freshpool import logs
    from freshpool.serve import apionly
    from freshpool.serve.reload import Reloader, api_unchanged

    def on_url(url: str) -> None:
        err.print(f"API and dashboard (api-only) at {url}; database {_safe(config)}")

    listener = None
    with apionly.opened(config) as store:
        while True:
            stop = _stop_on_signals()
            reloader = Reloader(config_path, config, stop, apionly.RELOAD_FILE)
            signal.signal(signal.SIGHUP, _reload_on(reloader))
            try:
                listener = apionly.serve(config, store, stop, listener, on_url)
            finally:
                reloader.close()
            new = reloader.next
            if new is None or not api_unchanged(config, new):
                listener.close()
                listener = None
            if new is None:
                return
            config = new
            logs.setup(config.log_level)


def _safe(config: Config) -> str:
    """The database URL without its password, for the log."""
    from sqlalchemy.engine import make_url

    from freshpool.store import db

    url = db.url_for(config.state_dir, config.database_url)
    return make_url(url).render_as_string(hide_password=True)


def _reload_on(reloader: Reloader) -> Callable[[int, Any], None]:
    def on_hup(_signum: int, _frame: Any) -> None:
        reloader.request()

    return on_hup


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        err.print(f"received {signal.Signals(signum).name}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
