"""A rolling upgrade of a fleet: a launcher of an older freshpool (the source of an
earlier commit of this repository, run as it was) drives the pool on PostgreSQL;
a launcher of this version joins, migrates the schema under the advisory lock
while the old one runs on, and the two share the providers. The old one, restarted
as it was, refuses the newer schema with a message saying what to do; upgraded, it
joins again. No node is handed out twice and none leaks on the way."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from freshpool.store import Store, db
from freshpool.store.migrations import HEAD
from tests.launcher.fleet import Fleet, Jobs, settled, wait_for
from tests.store.pg import TempPostgres

# The last commit on main before the lease-history and NOTIFY migrations: its
# schema is at 0007, and it has leases, so it can run in a fleet with this version.
OLD_COMMIT = "bc99401"
OLD_HEAD = "0007"
TTL = 3.0
READY = "SELECT count(*) FROM nodes WHERE state = 'ready'"
OLD_SETUP = """
import sys
from freshpool.core.states import BuildState
from freshpool.store import Store
store = Store(sys.argv[1])
build = store.new_build("img-1", "img", sys.argv[2])
store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")
"""
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def old_source(tmp_path: Path) -> Path:
    """The `src` tree of OLD_COMMIT, unpacked from this repository's history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_COMMIT, "src"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git clone with commit {OLD_COMMIT} (not a release tarball): {exc}")
    out = tmp_path / "old"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out / "src"


@pytest.fixture
def fleet(tmp_path: Path, postgres: TempPostgres) -> Iterator[Fleet]:
    made = Fleet(tmp_path, postgres.new_database(), 4, "min-ready: 4", TTL)
    yield made
    made.stop()


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return db.current_revision(conn)


def halves(fleet: Fleet) -> bool:
    return sorted(Counter(fleet.owners().values()).values()) == [2, 2]


def count(engine: Engine, query: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(query)).scalar() or 0)


def test_old_and_new_launchers_share_a_database_through_an_upgrade(
    fleet: Fleet, old_source: Path
) -> None:
    # The Fleet's store made the schema at this version's head: start over from the
    # old version's, made by the old code (opening this version's store would migrate).
    with fleet.store.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    fleet.store.close()
    subprocess.run(
        [sys.executable, "-c", OLD_SETUP, fleet.url, str(fleet.root / "no-layers")],
        env={**os.environ, "PYTHONPATH": str(old_source)},
        check=True,
    )
    plain = create_engine(fleet.url)
    assert revision(plain) == OLD_HEAD
    fleet.start("old", source=old_source)
    wait_for(lambda: count(plain, READY) == 4, 60, "4 ready nodes from the old launcher",
             lambda: fleet.log("old"))  # fmt: skip

    fleet.start("new")
    wait_for(lambda: revision(plain) == HEAD, 60, "the new launcher's migration",
             lambda: fleet.log("new"))  # fmt: skip
    mark = count(plain, "SELECT max(id) FROM node_events")
    plain.dispose()
    fleet.store = Store(fleet.url)
    jobs = Jobs(fleet)
    try:
        # The old launcher runs on against the newer schema, beside the new one.
        wait_for(lambda: halves(fleet), 60, "old and new driving two providers each",
                 lambda: str(fleet.owners()))  # fmt: skip
        assert fleet.launchers["old"].poll() is None, fleet.log("old")
        seen = len(jobs.got)
        wait_for(lambda: len(jobs.got) >= seen + 10, 60, "jobs served by the mixed fleet")
        # The old code writes no launcher in the history: these are its, since the upgrade.
        assert count(fleet.store.engine, f"SELECT count(*) FROM node_events WHERE id > {mark}"
                     " AND launcher IS NULL") > 0  # fmt: skip
        # Restarted as it was, the old version refuses the schema and says what to do.
        fleet.kill("old")
        refused = fleet.start("old", source=old_source)
        assert refused.wait(60) != 0
        fleet.launchers.pop("old")
        assert "newer than this freshpool knows" in fleet.log("old")
        wait_for(lambda: set(fleet.owners().values()) == {"new"} and len(fleet.owners()) == 4,
                 60, "the new launcher driving every provider")  # fmt: skip
        # Upgraded, it joins again.
        fleet.start("old")
        wait_for(lambda: halves(fleet), 60, "the upgraded launcher sharing again",
                 lambda: str(fleet.owners()))  # fmt: skip
        seen = len(jobs.got)
        wait_for(lambda: len(jobs.got) >= seen + 10, 60, "jobs served after the upgrade")
    finally:
        got = jobs.stop()
    assert jobs.errors == []
    assert len(got) == len(set(got)), "a node went to two jobs"
    assert max(fleet.handed_out().values()) == 1
    wait_for(lambda: settled(fleet, 4), 60, "4 ready nodes after the upgrade, no strays",
             fleet.describe)  # fmt: skip
