"""A version number that moves whenever any process commits to the store, for long-polls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from freshpool.store import ChangeWatcher, Store

POLL = 0.1


class ChangeFeed:
    """Watches the store's change counter from the event loop; waiters await a new version.

    One cheap look at the change counter serves every dashboard watching, instead of
    each of them re-reading the tables: a PRAGMA every POLL seconds on SQLite; on
    PostgreSQL the look comes when a NOTIFY reaches the listening socket.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version = 0
        # Called on the loop at each change (the scheduler, when other processes hand
        # out too: see serve/__init__.py).
        self.on_change: list[Callable[[], None]] = []
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin watching; call from inside the running event loop."""
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        watcher = ChangeWatcher(self.store.engine)
        try:
            while True:
                if watcher.changed():
                    await self.bump()
                await _readable(watcher.fileno(), POLL)
        finally:
            watcher.close()

    async def bump(self) -> None:
        self.version += 1
        for call in self.on_change:
            call()
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, since: int, timeout: float) -> int:
        """The version once it differs from `since`, or after `timeout` seconds."""
        if self.version != since or self._changed is None or timeout <= 0:
            return self.version
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.version != since), timeout
                )
        return self.version


async def _readable(fd: int | None, timeout: float) -> None:
    """Until `fd` has something to read, `timeout` seconds at most (no fd: sleep)."""
    if fd is None:
        await asyncio.sleep(timeout)
        return
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), timeout)
    finally:
        loop.remove_reader(fd)
