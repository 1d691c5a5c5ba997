"""Opening the database: engine settings per backend and migrations to the newest schema."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Dialect, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError

from freshpool.core.errors import Unavailable
from freshpool.store.migrations import HEAD, known_revisions

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# How often the background checkpointer folds the write-ahead log into the database.
CHECKPOINT_EVERY = 1.0

log = logging.getLogger("freshpool.store")


@dataclass
class SqliteSettings:
    """Per-engine choices the connect hook applies to every new connection."""

    # SQLite checkpoints on commit once the log passes 1000 pages: the commit that
    # crosses it copies the log into the database and syncs it, a stall on whichever
    # hand-out happens to commit then. A long-running server turns that
    # off and checkpoints on a thread of its own (Checkpointer).
    autocheckpoint: bool = True


# The store of every freshpool process when the config names no database-url (a
# service manager's environment, or a test run on PostgreSQL).
DATABASE_ENV = "FRESHPOOL_DATABASE_URL"


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'freshpool.db'}"


def url_for(state_dir: Path, configured: str | None) -> str:
    """The config's database-url, else $FRESHPOOL_DATABASE_URL, else SQLite in state-dir."""
    return configured or os.environ.get(DATABASE_ENV) or sqlite_url(state_dir)


def make_engine(url: str, settings: SqliteSettings | None = None) -> Engine:
    if url.startswith("sqlite"):
        # Waiters each hold a connection to watch for changes; SQLite connections are
        # cheap, so the pool is allowed to grow rather than make waiters queue.
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=10,
            max_overflow=500,
        )
        _tune_sqlite(engine, settings or SqliteSettings())
        return engine
    return create_engine(url, pool_pre_ping=True)


def _tune_sqlite(engine: Engine, settings: SqliteSettings) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module, so "begin" below decides.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if not settings.autocheckpoint:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Every writing transaction takes the write lock up front. A deferred
        # transaction that reads and then writes can fail with SQLITE_BUSY at the
        # upgrade, which the busy timeout does not cover; IMMEDIATE waits its turn
        # instead. Readers (execution option readonly=True) open no transaction:
        # each statement reads its own WAL snapshot, never blocked, and the store's
        # reads are one statement each. A BEGIN and its ROLLBACK cost more than
        # most of those reads (two more round trips through SQLAlchemy).
        if not conn.get_execution_options().get("readonly", False):
            # On the driver's connection: exec_driver_sql would take this BEGIN
            # through SQLAlchemy's whole execution path, a good part of a small
            # hand-out's cost.
            driver = conn.connection.driver_connection
            assert driver is not None, "a begun connection has its driver's"
            # At once: fail if another process holds the lock, instead of sleeping
            # in the busy handler; the transaction itself then never waits.
            at_once = conn.get_execution_options().get("at_once", False)
            if at_once:
                driver.execute("PRAGMA busy_timeout=0")
            try:
                with driver_errors(conn.dialect, "BEGIN IMMEDIATE"):
                    driver.execute("BEGIN IMMEDIATE")
            finally:
                if at_once:
                    driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def is_busy(error: DBAPIError) -> bool:
    """Whether SQLite refused for a lock another connection holds."""
    return getattr(error.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY


@contextmanager
def driver_errors(dialect: Dialect, statement: str, params: Any = ()) -> Iterator[None]:
    """Re-raise the driver's errors in work done on its connection directly as
    SQLAlchemy would raise them: callers (the API's 503) know those."""
    base = dialect.loaded_dbapi.Error
    try:
        yield
    except base as exc:
        raise DBAPIError.instance(statement, params, exc, base, dialect=dialect) from exc


def alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def current_revision(conn: Connection) -> str | None:
    """The schema revision Alembic last recorded in this database (None: none yet)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(found) if found is not None else None


class SchemaTooNew(Unavailable):
    """The database was upgraded by a newer freshpool than this one."""


def check_revision(revision: str | None) -> None:
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNew(
            f"the database's schema is at revision {revision}, newer than this freshpool "
            f"knows (up to {HEAD}): a newer freshpool upgraded it; upgrade freshpool here "
            "too (pip install -U freshpool) before starting it"
        )


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there already);
    SchemaTooNew if a newer freshpool has been at it."""
    with engine.connect() as conn:
        revision = current_revision(conn)
        if revision == HEAD:
            return
        check_revision(revision)
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Launchers of a fleet starting together: one migrates, the others wait
            # for it here and then find nothing left to do.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('freshpool:migrate'))"))
            if current_revision(conn) == HEAD:
                return
        command.upgrade(alembic_config(conn), "head")


class Checkpointer:
    """Folds SQLite's write-ahead log into the database every `every` seconds, off the
    hot path: a PASSIVE checkpoint never blocks writers, and its disk syncs happen on
    this thread, not in a hand-out's commit."""

    def __init__(self, engine: Engine, every: float = CHECKPOINT_EVERY) -> None:
        self._engine = engine
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = self._engine.raw_connection()
        try:
            while not self._stop.wait(self._every):
                try:
                    cur = conn.cursor()
                    cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    cur.close()
                except Exception:  # a full disk, say: the next round tries again
                    log.warning("WAL checkpoint failed", exc_info=True)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
