"""The store's foundation: one engine, its read and write transactions, the cluster id."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Connection, Table, Update, insert, select, update
from sqlalchemy.exc import OperationalError

from freshpool.core.errors import WriteBusy
from freshpool.store import db
from freshpool.store.changes import ChangeWatcher
from freshpool.store.fencing import Fence, Fencing
from freshpool.store.schema import meta


def cas_statement(table: Table, row_id: object, expect: str, values: dict[str, Any]) -> Update:
    """`UPDATE table SET ... WHERE id=? AND state=?`: the one way any row changes state
    (`row_id` and `values` may be bind parameters, for many rows at once)."""
    return update(table).where(table.c.id == row_id, table.c.state == expect).values(**values)


def compare_and_set(
    conn: Connection, table: Table, row_id: object, expect: str, values: dict[str, Any]
) -> bool:
    """True if the row was in `expect` and is now changed; False if someone moved it first."""
    return conn.execute(cas_statement(table, row_id, expect, values)).rowcount == 1


class StoreBase:
    def __init__(self, url: str) -> None:
        self.url = url
        # Every time the store writes comes from here; tests set it to replay a history
        # with known timestamps.
        self.clock: Callable[[], float] = time.time
        self._sqlite = db.SqliteSettings()
        self._checkpointer: db.Checkpointer | None = None
        self.engine = db.make_engine(url, self._sqlite)
        # Reads take a snapshot without the write lock (see db._tune_sqlite).
        self._reader = self.engine.execution_options(readonly=True)
        # Writes that must not wait for the lock (see _write).
        self._at_once = self.engine.execution_options(at_once=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        # Set by a launcher that shares the database with others: its writes for a
        # provider then check it still holds the provider's lease (store/fencing.py).
        self.fencing: Fencing | None = None
        db.upgrade(self.engine)
        self.cluster_id = self._cluster_id()

    @classmethod
    def open(cls, state_dir: Path, url: str | None = None) -> Self:
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(db.url_for(state_dir, url))

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()

    def checkpoint_in_background(self) -> None:
        """For a long-running server on SQLite: no commit stalls on a checkpoint; a thread
        checkpoints instead (see db.SqliteSettings). Other backends need nothing."""
        if self.engine.dialect.name != "sqlite" or self._checkpointer is not None:
            return
        self._sqlite.autocheckpoint = False
        # Pooled connections were opened with checkpoints on; new ones get the setting.
        self.engine.dispose()
        self._checkpointer = db.Checkpointer(self.engine)

    @property
    def shared_by_launchers(self) -> bool:
        """Whether several launchers may drive this store (PostgreSQL), so each holds
        leases on its providers; on SQLite one launcher has it all (launcherlock.py)."""
        return self.engine.dialect.name != "sqlite"

    @property
    def writes_never_block(self) -> bool:
        """Whether a write that finds the write lock free runs without waiting on
        anything: true for SQLite (a local file whose commits do not sync; the
        checkpoints that do run on their own thread), false for a server's database,
        where each statement is a round trip."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def _write(self, wait: bool = True) -> Iterator[Connection]:
        """A write transaction. With `wait` false it raises WriteBusy at once, having
        done nothing, if another writer holds the lock (SQLite only)."""
        # Threads of one process queue here for SQLite's single write lock: SQLite's
        # busy handler instead sleeps in coarse steps, far longer than a hand-out.
        if not self._write_lock.acquire(blocking=wait):
            raise WriteBusy("another thread of this process is writing")
        try:
            with (self.engine if wait else self._at_once).connect() as conn:
                try:
                    transaction = conn.begin()
                except OperationalError as exc:
                    if wait or not db.is_busy(exc):
                        raise
                    raise WriteBusy("another process is writing") from exc
                with transaction:
                    yield conn
        finally:
            self._write_lock.release()
        self._local.writes = self.writes_here() + 1

    def writes_here(self) -> int:
        """How many write transactions this thread has committed through this store."""
        return getattr(self._local, "writes", 0)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._reader.connect() as conn:
            yield conn

    def _fence_providers(self, conn: Connection, providers: Collection[str]) -> Fence:
        return self.fencing.check(conn, providers) if self.fencing is not None else {}

    def _fence_nodes(self, conn: Connection, node_ids: Collection[int]) -> Fence:
        return self.fencing.check_nodes(conn, node_ids) if self.fencing is not None else {}

    def _cluster_id(self) -> str:
        with self._write() as conn:
            found = conn.scalar(select(meta.c.value).where(meta.c.key == "cluster_id"))
            if found:
                return str(found)
            # Short enough to fit in interface and namespace names, random enough
            # that two state dirs on one host never share it.
            value = secrets.token_hex(4)
            conn.execute(insert(meta).values(key="cluster_id", value=value))
            return value

    def change_watcher(self) -> ChangeWatcher:
        return ChangeWatcher(self.engine)
