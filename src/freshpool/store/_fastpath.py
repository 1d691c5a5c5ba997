"""The hand-out's statements run straight on sqlite3's cursor: the one private fast path.

Every hand-out pass runs a handful of statements over many rows, and on SQLite the
work SQLAlchemy does around each execution and each parameter set costs several
times what the statement itself does. `run` takes a SQLAlchemy Core statement and
its parameters, as `Connection.execute` would, and on SQLite compiles it once and
hands it to the driver's cursor with the column types' own bind and result
processors; on any other database (and when `ENABLED` is off, as the store tests
switch it) it is `Connection.execute`. The SQL is SQLAlchemy's either way.

One SQLite fact it relies on: an INSERT that asks for its new ids in parameter order
(`returning(pk, sort_by_parameter_order=True)`) runs as one executemany without
RETURNING, and the ids are the `len(params)` consecutive ones ending at
`last_insert_rowid()`. That holds because every write transaction holds SQLite's
write lock from its BEGIN IMMEDIATE, so no other insert can come between, and the
tables' keys are AUTOINCREMENT (always the largest ever + 1).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Executable, Insert, insert

from freshpool.store.db import driver_errors

ENABLED = True
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Ran:
    """What a statement gave back: its rows by column name, and the rows it changed."""

    rows: Sequence[Mapping[str, Any]]
    rowcount: int


def run(conn: Connection, statement: Executable, params: Params) -> Ran:
    """Execute `statement` once (params a mapping) or for each of a sequence of them."""
    many = [] if isinstance(params, Mapping) else list(params)
    if not ENABLED or conn.dialect.name != "sqlite":
        result = conn.execute(statement, many or params)
        rows = [cast(Mapping[str, Any], r._mapping) for r in result] if result.returns_rows else []
        return Ran(rows, result.rowcount)
    one: Mapping[str, Any] = params if isinstance(params, Mapping) else (many[0] if many else {})
    ordered_ids = isinstance(statement, Insert) and statement._sort_by_parameter_order
    target = _insert_of(statement.table) if ordered_ids else statement  # type: ignore[attr-defined]  # an Insert has a table
    plan = _compiled(target, conn.dialect, tuple(sorted(one)))
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None, "run inside a transaction"
    cursor = dbapi.cursor()
    try:
        with driver_errors(conn.dialect, plan.sql, params):
            if isinstance(params, Mapping):
                cursor.execute(plan.sql, plan.bind(params))
            else:
                cursor.executemany(plan.sql, [plan.bind(p) for p in many])
            if ordered_ids:
                cursor.execute("SELECT last_insert_rowid()")
                (last,) = cursor.fetchone() or (0,)
                ids = range(last - len(many) + 1, last + 1)
                return Ran([{"id": i} for i in ids], len(many))
            got = [plan.row(values) for values in cursor.fetchall()] if cursor.description else []
            return Ran(list(got), cursor.rowcount)
    finally:
        cursor.close()


@functools.cache
def _insert_of(table: Any) -> Insert:
    """The table's INSERT without RETURNING, built once (so it compiles once)."""
    return insert(table)


@dataclass(frozen=True)
class _Compiled:
    sql: str
    # The positional parameters' names, in order, and which have a bind processor.
    names: Callable[[Mapping[str, Any]], Any]
    bind_processors: tuple[tuple[int, Callable[[Any], Any]], ...]
    # The statement's own values (the states it compares and sets).
    fixed: Mapping[str, Any]
    columns: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        values = self.names({**self.fixed, **params} if self.fixed else params)
        if not self.bind_processors:
            return values  # type: ignore[no-any-return]  # the getter gives a tuple
        out = list(values)
        for i, process in self.bind_processors:
            if out[i] is not None:
                out[i] = process(out[i])
        return tuple(out)

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        return {
            column: process(value) if process is not None and value is not None else value
            for column, process, value in zip(self.columns, self.processors, values, strict=True)
        }


@functools.lru_cache(maxsize=256)
def _compiled(statement: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
    # Every statement here is a ClauseElement, which compiles.
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
    names = tuple(compiled.positiontup or ())
    processors_in = (
        compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    binds = tuple((i, p) for i, p in enumerate(processors_in) if p is not None)
    fixed = {k: v for k, v in compiled.params.items() if v is not None}
    columns = tuple(c.key for c in getattr(statement, "exported_columns", ()))
    processors = tuple(
        c.type.dialect_impl(dialect).result_processor(dialect, None)
        for c in getattr(statement, "exported_columns", ())
    )
    getter = (
        operator.itemgetter(*names)
        if len(names) > 1
        else (lambda params: tuple(params[n] for n in names))
    )
    return _Compiled(compiled.string, getter, binds, fixed, columns, processors)
