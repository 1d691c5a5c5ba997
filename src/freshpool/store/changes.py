"""Telling cheaply whether any process committed to the store since the last look."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Engine

log = logging.getLogger("freshpool.store")

# What migration 0008's triggers NOTIFY on each commit that changes nodes or requests.
CHANNEL = "freshpool_changes"
# After the listening connection broke, how long before the next try to open one.
RECONNECT_EVERY = 1.0
# libpq's CONNECTION_OK (psycopg.pq.ConnStatus.OK), without importing psycopg on SQLite.
_OK = 0


class ChangeWatcher:
    """Tells cheaply whether another process committed since the last look.

    SQLite: its data_version changes on one connection when others commit. PostgreSQL:
    a connection of its own LISTENs on CHANNEL, and each look takes in what the
    server sent without a round trip. Either way the launcher and waiting clients
    wake at once when a node is released, without re-reading tables.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._conn: Any = None
        self._retry_at = 0.0
        if self._sqlite:
            self._conn = engine.raw_connection()
            self._last = self._version()
        else:
            self._listen()

    def _version(self) -> int:
        cur = self._conn.cursor()
        cur.execute("PRAGMA data_version")
        (value,) = cur.fetchone() or (0,)
        cur.close()
        return int(value)

    def _listen(self) -> bool:
        """Open the listening connection; False if the server cannot be reached now."""
        try:
            raw = self._engine.raw_connection()
            # Out of the pool: a pooled connection would carry the LISTEN to whoever
            # borrows it next, and this one is held for as long as the watcher lives.
            conn: Any = raw.driver_connection
            raw.detach()
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception:
            log.warning("cannot LISTEN for store changes; retrying", exc_info=True)
            self._retry_at = time.monotonic() + RECONNECT_EVERY
            return False
        self._conn = conn
        return True

    def changed(self) -> bool:
        if self._sqlite:
            now_version = self._version()
            changed, self._last = now_version != self._last, now_version
            return changed
        if self._conn is None:
            # Whatever was committed while nobody listened is unknown: say "maybe"
            # once the listener is back.
            return time.monotonic() >= self._retry_at and self._listen()
        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()
            if pgconn.status != _OK:
                raise ConnectionError("the server closed the connection")
        except Exception:
            log.warning("the connection listening for store changes broke", exc_info=True)
            self._drop()
            return True
        got = False
        while pgconn.notifies() is not None:
            got = True
        return got

    def fileno(self) -> int | None:
        """The listening socket on PostgreSQL (to wait on with select), else None."""
        if self._sqlite or self._conn is None:
            return None
        return int(self._conn.pgconn.socket)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._retry_at = time.monotonic() + RECONNECT_EVERY
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing a broken listener", exc_info=True)

    def close(self) -> None:
        if self._sqlite:
            self._conn.close()
        else:
            self._drop()
