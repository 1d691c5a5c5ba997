"""The observer in `freshpool serve`: beside the launcher, publishing for the API.

The observer runs in the launcher's process, not in the API's. A look is Python
work in proportion to what happened (about 20 µs a hand-out); in the API's process
it took the interpreter from the very hand-outs it was counting, in stretches of
5-50 ms, and those stretches were the hand-outs' p99. The launcher's process has a
core to spare.

After each look it publishes what the API shows: the Prometheus text of its metrics
and the dashboard's charts, in one file in the state dir, replaced whole (a reader
never sees half of it). The API re-reads the file only when it has been replaced.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, generate_latest

from freshpool import metrics
from freshpool.config import Config
from freshpool.service.launcher import Launcher
from freshpool.service.observer import BUCKET, WINDOW, Observer

log = logging.getLogger("freshpool.observer")

PUBLISHED = "observed.json"
# Looks come after launcher passes, at most this often. Under a stream of hand-outs
# the launcher passes tens of times a second; metrics a tenth of a second late cost
# nobody anything.
OBSERVE_EVERY = 0.1


@dataclass(frozen=True)
class Observed:
    metrics: bytes  # Prometheus' text format
    history: dict[str, Any]  # Observer.history(): the dashboard's charts


NOTHING_YET = Observed(b"", {"bucket_seconds": BUCKET, "window_seconds": WINDOW, "points": []})


class Observing:
    """An Observer on a thread of its own, looking after the launcher's passes."""

    def __init__(self, config: Config, launcher: Launcher) -> None:
        self.path = config.state_dir / PUBLISHED
        self.statsd = config.statsd
        self.observer = Observer(launcher.store, leaks=lambda: launcher.leaks_found)
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        launcher.add_pass(self._due.set)

    def start(self) -> None:
        # A previous run's figures are not this run's.
        self.path.unlink(missing_ok=True)
        metrics.use_statsd(self.statsd)
        self._due.set()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._due.set()
        self._thread.join(timeout=30)
        metrics.use_statsd(None)

    def _run(self) -> None:
        while True:
            self._due.wait()
            if self._stopping.is_set():
                return
            self._due.clear()
            try:
                self.observer.tick()
                publish(self.path, Observed(generate_latest(REGISTRY), self.observer.history()))
            except Exception:
                # A store that fails now (locked, unreachable) may not later: look again.
                log.exception("observer pass failed")
            self._stopping.wait(OBSERVE_EVERY)


def publish(path: Path, observed: Observed) -> None:
    text = json.dumps({"metrics": observed.metrics.decode(), "history": observed.history})
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(text)
    os.replace(part, path)


class Published:
    """What the observer last published, read where the API runs."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PUBLISHED
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._observed = NOTHING_YET

    def read(self) -> Observed:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return NOTHING_YET  # no look yet (or no observer: the API alone in a test)
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if version != self._seen:
                data = json.loads(self.path.read_text())
                self._observed = Observed(data["metrics"].encode(), data["history"])
                self._seen = version
            return self._observed
