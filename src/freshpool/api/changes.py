"""A version number that moves whenever any process commits to the store, for long-polls."""

from __future__ import annotations

import asyncio
import contextlib

from freshpool.store import ChangeWatcher, Store

POLL = 0.1


class ChangeFeed:
    """Watches the store's change counter from the event loop; waiters await a new version.

    One cheap PRAGMA every POLL seconds serves every dashboard watching, instead of
    each of them re-reading the tables.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version = 0
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
                await asyncio.sleep(POLL)
        finally:
            watcher.close()

    async def bump(self) -> None:
        self.version += 1
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
