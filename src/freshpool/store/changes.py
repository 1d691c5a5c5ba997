"""Telling cheaply whether any process committed to the store since the last look."""

from __future__ import annotations

import time

from sqlalchemy import Engine


class ChangeWatcher:
    """Tells cheaply whether another process committed since the last look.

    SQLite's data_version changes on one connection when others commit, so the
    launcher and waiting clients wake at once when a node is released, without
    re-reading tables. Other backends say "maybe" at most every `poll` seconds
    (LISTEN/NOTIFY would make PostgreSQL as prompt; not needed on one host).
    """

    def __init__(self, engine: Engine, poll: float = 0.1) -> None:
        self._conn = engine.raw_connection() if engine.dialect.name == "sqlite" else None
        self._poll = poll
        self._next = time.monotonic() + poll
        self._last = self._version()

    def _version(self) -> int:
        if self._conn is None:
            return 0
        cur = self._conn.cursor()
        cur.execute("PRAGMA data_version")
        (value,) = cur.fetchone() or (0,)
        cur.close()
        return int(value)

    def changed(self) -> bool:
        if self._conn is None:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + self._poll
            return True
        now_version = self._version()
        changed, self._last = now_version != self._last, now_version
        return changed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
