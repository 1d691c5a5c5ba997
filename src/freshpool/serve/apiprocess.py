"""The API process: the scheduler and the HTTP API, beside `serve`'s launcher process.

It does hand-outs and little else: launcher passes, driver calls, node tests and
the metrics' bookkeeping run in the other process, so they never take this one's
interpreter from a hand-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import threading
from collections.abc import Callable

from sqlalchemy.exc import OperationalError

from freshpool import logs
from freshpool.api.app import create_app
from freshpool.api.server import ApiServer
from freshpool.api.services import Services
from freshpool.config import Config
from freshpool.dispatch.scheduler import Scheduler
from freshpool.serve.link import FAILED, PASS, UNREACHABLE, UP, WAKE, Link
from freshpool.store import Store

# Allocations between young collections, and young (then middle) collections between
# older ones: a hand-out over HTTP allocates thousands of short-lived objects, and at
# the default threshold the collector made a young pass every call or two.
GC_THRESHOLDS = (20_000, 50, 100)


def main(config: Config, listener: socket.socket | None, end: socket.socket) -> None:
    """The process's body (spawned: a fresh interpreter, nothing inherited but the
    config, the listening socket and its end of the link)."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; this one
    # keeps serving while `serve` winds its launcher down, then the link closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(config.log_level)
    link = Link(end)
    try:
        store = Store.open(config.state_dir, config.database_url)
    except OperationalError as exc:
        # A database down or cut off for a moment: the launcher tries again.
        link.send(UNREACHABLE + b" " + str(exc.orig or exc).encode())
        link.close()
        return
    try:
        try:
            serving = Serving(config, store, listener, wake=lambda: link.send(WAKE))
        except Exception as exc:
            link.send(FAILED + b" " + str(exc).encode())
            raise
        link.send(UP)
        # The launcher's messages, until its end closes: then this process stops.
        while message := link.receive():
            if message == PASS:
                serving.scheduler.launcher_passed()
        serving.stop()
    finally:
        store.close()
        link.close()


class Serving:
    """The scheduler, and the API on `listener` when given (else the scheduler alone,
    on a loop of its own: a CLI's requests are still served in turn)."""

    def __init__(
        self, config: Config, store: Store, listener: socket.socket | None, wake: Callable[[], None]
    ) -> None:
        store.checkpoint_in_background()
        self.scheduler = Scheduler(config, store, short=wake)
        self.services = Services(config, store, self.scheduler, wake=wake)
        if store.shared_by_launchers:
            # Other API servers (serve --api-only) and launchers of the fleet hand out
            # and release too: a change anyone commits is this scheduler's cue to pass
            # (newly ready nodes; waiters of requests served elsewhere).
            self.services.changes.on_change.append(self.scheduler.poke)
        self.server: ApiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if listener is not None:
            self.server = ApiServer(create_app(self.services), listener, config.api.tls)
            self.server.start()
        else:
            self._thread = threading.Thread(target=self._alone, name="scheduler", daemon=True)
            self._thread.start()
        # Everything made so far (config, app, routes, compiled statements) lives as
        # long as the process: out of the collector's full passes, which scanned it
        # all and stalled every thread.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def _alone(self) -> None:
        async def scheduling() -> None:
            self._loop = asyncio.get_running_loop()
            with contextlib.suppress(asyncio.CancelledError):
                await self.scheduler.start()

        asyncio.run(scheduling())

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self._loop is not None and self._thread is not None:
            # RuntimeError: the loop has ended already (its scheduler died of an error).
            with contextlib.suppress(RuntimeError):
                for task in asyncio.all_tasks(self._loop):
                    self._loop.call_soon_threadsafe(task.cancel)
            self._thread.join(timeout=30)
