"""The fleet's image builder: with several launchers on one PostgreSQL, one at a time
does the image work (the builder lease). A launcher starting does not fail the build
another is running; when the builder dies, another takes the lease within a TTL and
fails what it left building; a `--no-build` launcher never builds.

In process, on a real PostgreSQL: the image controllers' passes are called directly,
and the image is paused so no real build starts (the lease is what is under test)."""

from __future__ import annotations

import time
from pathlib import Path

from freshpool import launcher as launching
from freshpool.config import Config, parse
from freshpool.core.fleet import BUILDER_LEASE
from freshpool.core.states import BuildState
from freshpool.drivers.base import load_driver
from freshpool.launcher import Launcher
from freshpool.store import Store
from tests.store.pg import TempPostgres

TTL = 1.0


def config_for(tmp_path: Path, url: str, name: str) -> Config:
    return parse(f"""
state-dir: {tmp_path / name}
database-url: "{url}"
launcher-id: {name}
lease-ttl: {TTL}
providers: [{{name: cloud, driver: sim, sim: {{path: {tmp_path / "cloud.db"}}}}}]
labels: [{{name: debian, image: img}}]
images: [{{name: img}}]
""")


def launcher_for(tmp_path: Path, url: str, name: str, builds: bool = True) -> Launcher:
    config = config_for(tmp_path, url, name)
    store = Store(url)
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    made = launching.build(config, store, drivers, automatic_builds=builds, publish=False)
    assert made.images is not None
    made.images.start()
    return made


def builder(store: Store) -> str | None:
    lease = store.leases().get(BUILDER_LEASE)
    return lease.owner if lease is not None and lease.expires_at > time.time() else None


def test_one_launcher_builds_for_the_fleet_and_another_takes_over(
    tmp_path: Path, postgres: TempPostgres
) -> None:
    url = postgres.new_database()
    store = Store(url)
    store.set_paused("img", True)
    a = launcher_for(tmp_path, url, "a")
    assert a.images is not None
    a.images.tick()
    assert builder(store) == "a"
    # a's build under way (its worker's row).
    running = store.new_build("img-2", "img", str(tmp_path / "img-2"))
    b = launcher_for(tmp_path, url, "b")
    never = launcher_for(tmp_path, url, "c", builds=False)
    assert b.images is not None and never.images is not None
    for _ in range(5):
        a.images.tick()
        b.images.tick()
        never.images.tick()
        time.sleep(TTL / 5)
    assert builder(store) == "a"
    assert store.build(running.id).state == BuildState.BUILDING, "b's start failed a's build"
    # a dies (stops renewing): b takes the lease within a TTL and a pass, and fails
    # the build a left running; c, with --no-build, never does.
    died = time.monotonic()
    while builder(store) != "b":
        assert time.monotonic() - died < TTL + 1.0, f"no takeover: {store.leases()}"
        b.images.tick()
        never.images.tick()
        time.sleep(0.02)
    after = store.build(running.id)
    assert after.state == BuildState.FAILED and "previous image builder" in after.reason
    # a, back, finds its lease gone and does not build.
    a.images._next_lease = 0.0
    a.images.tick()
    assert builder(store) == "b" and a.images._lease is None
    # b stopping lets the lease go at once: a takes it on its next look.
    b.images.stop()
    a.images._next_lease = 0.0
    a.images.tick()
    assert builder(store) == "a"
    a.images.stop()
    for made in (a, b, never):
        made.shared.store.close()
    store.close()
