"""Store fixtures: every store test runs on the embedded SQLite (both ways of running the
hand-out) and on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.store import Store, _fastpath, db


@pytest.fixture(params=["sqlite", "sqlite-plain", "postgresql"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    """SQLite with the hand-out's fast path and without it (store/_fastpath.py), and
    PostgreSQL (which always takes the plain path)."""
    if request.param.startswith("sqlite"):
        monkeypatch.setattr(_fastpath, "ENABLED", request.param == "sqlite")
        s = Store(db.sqlite_url(tmp_path))
    else:
        s = Store(request.getfixturevalue("postgres").new_database())
    yield s
    s.close()
