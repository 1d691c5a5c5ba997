"""Lets API handlers (asyncio) and plain threads wait for a change of a request.

The scheduler changes requests on its own thread; notify() wakes each waiter in its
own way: an asyncio waiter through its loop's call_soon_threadsafe, a thread through
a threading.Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable

Waiter = asyncio.Event | threading.Event


class Waiters:
    """Request id -> how to wake each waiter on it; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, dict[Waiter, Callable[[], None]]] = {}

    def watch(self, request_id: int) -> asyncio.Event:
        """Register interest from inside a running event loop; unwatch() when done."""
        event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:
            # The loop may have stopped (server shutting down); nothing waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

        self._add(request_id, event, wake)
        return event

    def watch_thread(self, request_id: int) -> threading.Event:
        """Register interest from a plain thread; unwatch() when done."""
        event = threading.Event()
        self._add(request_id, event, event.set)
        return event

    def _add(self, request_id: int, event: Waiter, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiting.setdefault(request_id, {})[event] = wake

    def unwatch(self, request_id: int, event: Waiter) -> None:
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
