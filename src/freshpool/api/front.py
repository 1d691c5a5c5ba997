"""What serves CI beside the launcher: the request scheduler, the observer (metrics,
statsd, charts) and the HTTP API. `freshpool serve` runs it in a process of its own
(see serving.py); tests that reach inside it run it in theirs."""

from __future__ import annotations

import gc
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from freshpool import metrics
from freshpool.api.app import create_app
from freshpool.api.server import ApiServer
from freshpool.api.services import Services
from freshpool.config import Config
from freshpool.service.observer import Observer
from freshpool.service.scheduler import Scheduler
from freshpool.store import Store

log = logging.getLogger("freshpool.observer")


# The observer reads new history at most this often. Under a stream of hand-outs the
# launcher passes tens of times a second, and reading after each one cost the API a
# quarter of its throughput; metrics a tenth of a second late cost nobody anything.
OBSERVE_EVERY = 0.1


@dataclass
class Front:
    services: Services
    server: ApiServer | None
    threads: list[threading.Thread]
    stopping: threading.Event
    observe: threading.Event

    @property
    def scheduler(self) -> Scheduler:
        return self.services.scheduler

    def after_launcher_pass(self) -> None:
        """After each launcher pass: nodes may be ready (the scheduler looks now, and
        from the first pass on it hands out), and there is new history for the metrics."""
        self.scheduler.launcher_pass()
        self.observe.set()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.stopping.set()
        self.observe.set()
        for thread in self.threads:
            thread.join(timeout=30)
        metrics.use_statsd(None)


def _observing(observer: Observer, observe: threading.Event, stopping: threading.Event) -> None:
    while True:
        observe.wait()
        if stopping.is_set():
            return
        observe.clear()
        try:
            observer.tick()
        except Exception:
            # A store that fails now (locked, unreachable) may not later: look again.
            log.exception("observer pass failed")
        stopping.wait(OBSERVE_EVERY)


def start_front(
    config: Config,
    store: Store,
    listener: socket.socket | None,
    wake: Callable[[], None],
    leaks: Callable[[], int],
) -> Front:
    """Start the scheduler, and the API on `listener` when given.

    `wake` starts the launcher's next pass (requests wait for nodes that are not
    ready; nodes were released); `leaks` is how many leaked instances it found.
    Raises server.ListenError when the API does not come up.
    """
    store.checkpoint_in_background()
    scheduler = Scheduler(config, store, short=wake)
    services = Services(config, store, scheduler, Observer(store, leaks=leaks), wake=wake)
    server = None
    if listener is not None:
        server = ApiServer(create_app(services), listener)
        server.start()
    metrics.use_statsd(config.statsd)
    stopping, observe = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=scheduler.run, args=(stopping,), name="scheduler", daemon=True),
        threading.Thread(
            target=_observing,
            args=(services.observer, observe, stopping),
            name="observer",
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    # Everything made so far (config, app, routes, SQLAlchemy's compiled statements)
    # lives as long as the process: keep it out of the collector's full passes. With
    # it in, each full collection scanned it all and stalled every thread 40-60 ms.
    gc.freeze()
    return Front(services, server, threads, stopping, observe)
