"""Store fixtures: every store test runs on the embedded SQLite and on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store.open(tmp_path)
    else:
        s = Store(request.getfixturevalue("postgres").new_database())
    yield s
    s.close()
