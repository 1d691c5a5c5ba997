"""What the launcher's process publishes for the API's: the Prometheus text of its
metrics and the dashboard's charts, in one file in the state dir.

The file is replaced whole, so a reader never sees half of it, and the API re-reads
it only when it has been replaced.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PUBLISHED = "observed.json"
# The dashboard's charts: an hour in buckets of this many seconds.
WINDOW = 3600.0
BUCKET = 20.0


@dataclass(frozen=True)
class Observed:
    metrics: bytes  # Prometheus' text format
    history: dict[str, Any]  # Observer.history(): the dashboard's charts


NOTHING_YET = Observed(b"", {"bucket_seconds": BUCKET, "window_seconds": WINDOW, "points": []})


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
