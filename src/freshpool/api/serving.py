"""What `freshpool serve` runs beside the launcher: scheduler, observer, statsd, the API."""

from __future__ import annotations

import contextlib
import gc
import threading
from dataclasses import dataclass
from pathlib import Path

from freshpool import metrics
from freshpool.api.app import create_app
from freshpool.api.server import ApiServer
from freshpool.api.services import Services
from freshpool.config import Config
from freshpool.service.launcher import Launcher
from freshpool.service.observer import Observer
from freshpool.service.scheduler import Scheduler
from freshpool.store import Store

URL_FILE = "api.url"


@dataclass
class Running:
    services: Services
    server: ApiServer | None
    url_file: Path | None
    scheduling: threading.Thread
    stopping: threading.Event

    @property
    def url(self) -> str | None:
        return self.server.url if self.server else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.stopping.set()
        self.scheduling.join(timeout=30)
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.url_file.unlink()
        metrics.use_statsd(None)


def start(config: Config, store: Store, launcher: Launcher, port: int | None = None) -> Running:
    """Hook the scheduler and observer into the launcher's passes; start the API if enabled.

    Raises server.ListenError when the API cannot listen; nothing has started then.
    """
    store.checkpoint_in_background()
    # The scheduler hands out what is ready and wakes the launcher for what is not.
    scheduler = Scheduler(config, store, short=launcher.wake)
    observer = Observer(store, leaks=lambda: int(getattr(launcher, "leaks_found", 0)))
    services = Services(config, store, scheduler, observer, wake=launcher.wake)
    server = None
    url_file = None
    if config.api.enabled:
        server = ApiServer(
            create_app(services), config.api.listen, config.api.port if port is None else port
        )
        url = server.start()
        # Where clients on this host (and tests using port 0) find the API.
        url_file = config.state_dir / URL_FILE
        url_file.write_text(url + "\n")
    metrics.use_statsd(config.statsd)
    launcher.add_pass(scheduler.launcher_pass)
    launcher.add_pass(observer.tick)
    stopping = threading.Event()
    scheduling = threading.Thread(
        target=scheduler.run, args=(stopping,), name="scheduler", daemon=True
    )
    scheduling.start()
    # Everything made so far (config, app, routes, SQLAlchemy's compiled statements)
    # lives as long as the process: keep it out of the collector's full passes. With
    # it in, each full collection scanned it all and stalled every thread 40-60 ms.
    gc.freeze()
    return Running(services, server, url_file, scheduling, stopping)
