"""A cloud's quota, read on the driver's worker threads and never on the launcher's
loop: the last answer is used while a new one is read. Until the first read, and
while the quota cannot be read, the answer is None (unknown is not zero), and only
`max-nodes` applies; the provider's `max-cores` and `max-ram` apply on top of the
cloud's quota once the size of its nodes is known."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any

from freshpool.drivers.cloud.calls import Blocking

log = logging.getLogger("freshpool.drivers.cloud")


class QuotaRoom(ABC):
    """`room()`: the nodes of ours that fit in the cloud's quota, less what runs there
    that is not ours, and in the provider's caps; read again every `interval`."""

    def __init__(self, provider: str, blocking: Blocking, interval: float,
                 max_cores: int | None, max_ram: int | None) -> None:  # fmt: skip
        self.provider = provider
        self.blocking = blocking
        self.interval = interval
        self.max_cores, self.max_ram = max_cores, max_ram
        self._lock = threading.Lock()
        self._room: int | None = None
        self._read_at = 0.0
        self._reading: Future[int | None] | None = None
        # What the last read found (the figures and the room they leave).
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

    @abstractmethod
    def node_size(self) -> tuple[int, int]:
        """Blocking: the vCPUs and RAM (MiB) of the largest node the provider launches."""

    @abstractmethod
    def read(self, size: tuple[int, int]) -> int | None:
        """Blocking: the nodes of ours the cloud's quota leaves room for (None:
        unknown), sets `last`."""

    def _read(self) -> int | None:
        cores, ram = self.node_size()
        fits = [self.read((cores, ram))]
        if self.max_cores is not None:
            fits.append(self.max_cores // max(1, cores))
        if self.max_ram is not None:
            fits.append(self.max_ram // max(1, ram))
        known = [f for f in fits if f is not None]
        room = min(known) if known else None
        self.last = {**self.last, "nodes_fit": room}
        return room
