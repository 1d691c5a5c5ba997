"""A cloud's quota, read on the driver's worker threads and never on the launcher's
loop: the last answer is used while a new one is read. Until the first read, and
while the quota cannot be read, the answer is None (unknown is not zero), and only
the provider's own caps apply."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from freshpool.drivers.cloud.calls import Blocking

log = logging.getLogger("freshpool.drivers.cloud")


class QuotaRoom:
    """`room()`: the nodes of ours that fit in the cloud's quota, less what runs there
    that is not ours, by the blocking `read()`, read again every `interval`."""

    def __init__(self, provider: str, blocking: Blocking, interval: float,
                 read: Callable[[], int | None]) -> None:  # fmt: skip
        self.provider = provider
        self.blocking = blocking
        self.interval = interval
        self._read = read
        self._lock = threading.Lock()
        self._room: int | None = None
        self._read_at = 0.0
        self._reading: Future[int | None] | None = None
        # What the last read found, for `freshpool providers` and the tests.
        self.last: dict[str, Any] = {}

    def room(self) -> int | None:
        with self._lock:
            if self._reading is not None and self._reading.done():
                self._finish(self._reading)
            stale = time.monotonic() >= self._read_at + self.interval
            if stale and self._reading is None:
                self._reading = self.blocking.submit(self._read)
            return self._room

    def refused(self) -> None:
        """The cloud refused a launch for quota: read it again at once."""
        with self._lock:
            self._read_at = 0.0

    def _finish(self, reading: Future[int | None]) -> None:
        self._reading = None
        self._read_at = time.monotonic()
        try:
            self._room = reading.result()
        except Exception as exc:
            log.warning("provider %s: reading the quota failed: %s", self.provider, exc)
            self.last = {"error": str(exc)}
            self._room = None
