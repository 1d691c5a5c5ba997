"""Lets API handlers (asyncio) await a change of a request that another thread makes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable


class Waiters:
    """Request id -> events of the handlers waiting on it; notify() is thread-safe.

    The scheduler runs in the launcher thread and the API in uvicorn's event loop,
    so a notification is handed to the waiter's own loop with call_soon_threadsafe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def watch(self, request_id: int) -> asyncio.Event:
        """Register interest from inside a running event loop; unwatch() when done."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiting.setdefault(request_id, set()).add(entry)
        return event

    def unwatch(self, request_id: int, event: asyncio.Event) -> None:
        with self._lock:
            entries = self._waiting.get(request_id, set())
            for entry in [e for e in entries if e[1] is event]:
                entries.discard(entry)
            if not entries:
                self._waiting.pop(request_id, None)

    def watched(self) -> set[int]:
        with self._lock:
            return set(self._waiting)

    def notify(self, request_ids: Iterable[int]) -> None:
        with self._lock:
            entries = [e for i in request_ids for e in self._waiting.get(i, ())]
        for loop, event in entries:
            # The loop may have stopped (server shutting down); nothing waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
