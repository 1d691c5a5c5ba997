"""Lets API handlers (asyncio) wait for a change of a request that another thread makes.

The scheduler changes requests on its own thread; notify() wakes each waiter
through its own loop's call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable


class Waiters:
    """Request id -> how to wake each waiter on it; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, dict[asyncio.Event, Callable[[], None]]] = {}

    def watch(self, request_id: int) -> asyncio.Event:
        """Register interest from inside a running event loop; unwatch() when done."""
        event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:
            # The loop may have stopped (server shutting down); nothing waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

        with self._lock:
            self._waiting.setdefault(request_id, {})[event] = wake
        return event

    def unwatch(self, request_id: int, event: asyncio.Event) -> None:
        with self._lock:
            entries = self._waiting.get(request_id, {})
            entries.pop(event, None)
            if not entries:
                self._waiting.pop(request_id, None)

    def watched(self) -> set[int]:
        with self._lock:
            return set(self._waiting)

    def notify(self, request_ids: Iterable[int]) -> None:
        with self._lock:
            wakes = [w for i in request_ids for w in self._waiting.get(i, {}).values()]
        for wake in wakes:
            wake()
