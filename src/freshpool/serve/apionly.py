"""`freshpool serve --api-only`: the HTTP API, the dashboard and the request scheduler
against a fleet's PostgreSQL, on any host, with no launcher and no provider driven.

There is no link to a launcher here (serve/__init__.py maps what replaces it): the
scheduler passes when the store's NOTIFY says nodes or requests changed, and the
launchers learn of this server's requests and releases from the same NOTIFY. Its
hand-outs are safe beside other API servers' (store/handout.py locks what it
serves), so any number of these may run.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator

from freshpool import launcherlock
from freshpool.api.server import bind, check_tls, url_of
from freshpool.config import Config
from freshpool.core.errors import BadInput
from freshpool.serve.apiprocess import Serving
from freshpool.store import Store, db

log = logging.getLogger("freshpool.serve")
URL_FILE = "api.url"
# What this process writes into its state directory's api.lock as the holder.
API_ONLY = "freshpool serve --api-only"
# Where its config reloads are reported (serve's own is reload.RESULT_FILE).
RELOAD_FILE = "reload-api.json"


class NotShared(BadInput):
    """The config cannot serve an API beside launchers on other hosts."""


def check(config: Config) -> None:
    """Refuse a config api-only cannot serve: a file database, or the API off."""
    if db.url_for(config.state_dir, config.database_url).startswith("sqlite"):
        # A file database is one host's, and on that host `serve` already runs the
        # API beside its launcher: a second API server there would add a writer to
        # the file and nothing else (on a network filesystem, SQLite's locks fail).
        raise NotShared(
            "`serve --api-only` shares the database with launchers on other hosts, and"
            " SQLite is a file on one host: set database-url to a PostgreSQL database"
            " the launchers use (on the launcher's host, `freshpool serve` serves the"
            " API already)"
        )
    if not config.api.enabled:
        raise NotShared("`serve --api-only` serves the API: api.enabled is false")


def run(config: Config, stop: threading.Event, on_url: Callable[[str], None] | None = None) -> None:
    """Serve until `stop` is set (what `serve --api-only` does between reloads)."""
    with opened(config) as store:
        serve(config, store, stop, None, on_url).close()


@contextlib.contextmanager
def opened(config: Config) -> Iterator[Store]:
    """The store, once `config` is checked and the state directory's API lock taken
    (not the launcher's: no node is driven here, and a launcher may share the
    directory); held across reloads."""
    check(config)
    with launcherlock.holding(config.state_dir, API_ONLY, launcherlock.API_LOCK_FILE):
        store = Store.open(config.state_dir, config.database_url)
        try:
            yield store
        finally:
            store.close()


def serve(
    config: Config,
    store: Store,
    stop: threading.Event,
    listener: socket.socket | None,
    on_url: Callable[[str], None] | None = None,
) -> socket.socket:
    """Serve on `listener` (bound here if None) until `stop`; the listening socket,
    still open, so a reload that keeps the address keeps the connections queued."""
    check_tls(config.api.tls)
    if listener is None:
        listener = bind(config.api.listen, config.api.port)
    # The launchers wake on this server's commits (NOTIFY): nothing to tell them.
    # The server closes the socket it serves on when it stops; it gets a duplicate,
    # so ours stays open (listening) for the next run.
    serving = Serving(config, store, listener.dup(), wake=lambda: None)
    url_file = config.state_dir / URL_FILE
    try:
        url = url_of(listener, config.api.tls)
        url_file.write_text(url + "\n")
        if on_url is not None:
            on_url(url)
        _wait_for_a_launcher(config, store, serving, stop)
        stop.wait()
    except BaseException:
        listener.close()
        raise
    finally:
        serving.stop()
        with contextlib.suppress(FileNotFoundError):
            url_file.unlink()
    return listener


def _wait_for_a_launcher(
    config: Config, store: Store, serving: Serving, stop: threading.Event
) -> None:
    """Hand out only once some launcher is live, as `serve` does from its launcher's
    first pass: a ready row nobody has reconciled with its provider since the fleet
    was down may name an instance that is gone. Until then requests are queued."""
    every = config.lease_ttl / 10
    while not stop.is_set():
        if store.live_launchers(config.lease_ttl):
            serving.scheduler.launcher_passed()
            return
        stop.wait(every)
