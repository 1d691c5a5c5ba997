"""What serves CI beside the launcher: the request scheduler and the HTTP API.
`freshpool serve` runs it in a process of its own (see serving.py); tests that reach
inside it run it in theirs. The observer is not here but beside the launcher
(service/observing.py): this process does hand-outs and little else."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from freshpool.api.app import served_app
from freshpool.api.server import ApiServer
from freshpool.api.services import Services
from freshpool.config import Config
from freshpool.service.scheduler import Scheduler
from freshpool.store import Store

# Allocations between young collections, and young (then middle) collections between
# older ones.
GC_THRESHOLDS = (20_000, 50, 100)


@dataclass
class Front:
    services: Services
    server: ApiServer | None
    thread: threading.Thread
    stopping: threading.Event

    @property
    def scheduler(self) -> Scheduler:
        return self.services.scheduler

    def after_launcher_pass(self) -> None:
        """After each launcher pass nodes may be ready: the scheduler looks now, and
        from the first pass on it hands out."""
        self.scheduler.launcher_pass()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.stopping.set()
        self.thread.join(timeout=30)


def start_front(
    config: Config, store: Store, listener: socket.socket | None, wake: Callable[[], None]
) -> Front:
    """Start the scheduler, and the API on `listener` when given.

    `wake` starts the launcher's next pass (requests wait for nodes that are not
    ready; nodes were released). Raises server.ListenError when the API does not
    come up.
    """
    store.checkpoint_in_background()
    scheduler = Scheduler(config, store, short=wake)
    services = Services(config, store, scheduler, wake=wake)
    server = None
    if listener is not None:
        server = ApiServer(served_app(services), listener)
        server.start()
    stopping = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stopping,), name="scheduler", daemon=True)
    thread.start()
    # Everything made so far (config, app, routes, SQLAlchemy's compiled statements)
    # lives as long as the process: keep it out of the collector's full passes. With
    # it in, each full collection scanned it all and stalled every thread 40-60 ms.
    gc.freeze()
    # A hand-out over HTTP allocates thousands of objects, nearly all freed at once;
    # at the default threshold (700) the collector made a young pass every call or
    # two. At 50 HTTP clients: 9-13% more hand-outs/s, p99 4-7 ms lower (paired runs
    # on a calm host; better in all five pairs).
    gc.set_threshold(*GC_THRESHOLDS)
    return Front(services, server, thread, stopping)
