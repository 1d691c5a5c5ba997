"""Several `freshpool serve` launchers on one PostgreSQL with simulated clouds: the
providers are spread over them, a killed launcher's providers are taken over within
a lease TTL with no node leaked or handed out twice, and fleet-wide caps hold."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.launcher.fleet import Fleet, Jobs, settled, wait_for
from tests.store.pg import TempPostgres

TTL = 4.0


@pytest.fixture
def make_fleet(tmp_path: Path, postgres: TempPostgres) -> Iterator[type[Fleet]]:
    made: list[Fleet] = []

    class Made(Fleet):
        def __init__(self, clouds: int, label: str, ttl: float = TTL) -> None:
            super().__init__(tmp_path, postgres.new_database(), clouds, label, ttl)
            made.append(self)

    yield Made
    for fleet in made:
        fleet.stop()


def test_a_killed_launchers_providers_are_taken_over_within_a_ttl(
    make_fleet: type[Fleet],
) -> None:
    fleet = make_fleet(4, "min-ready: 4")
    fleet.start("a")
    wait_for(lambda: set(fleet.owners().values()) == {"a"} and len(fleet.owners()) == 4, 60, "a")
    fleet.start("b", api=True)
    # b joins: half the providers move to it, once a has handed them over.
    wait_for(lambda: sorted(Counter(fleet.owners().values()).values()) == [2, 2], 60, "a 2/2 split")
    wait_for(lambda: settled(fleet, 4), 60, "4 ready nodes, no strays")
    jobs = Jobs(fleet)
    try:
        wait_for(lambda: len(jobs.got) >= 5, 60, "jobs running")
        before = fleet.store.leases()
        of_a = [p for p, lease in before.items() if lease.owner == "a"]
        killed = time.monotonic()
        fleet.kill("a")
        taken = wait_for(
            lambda: fleet.owners() == dict.fromkeys(fleet.clouds, "b"), 60, "b takes over"
        )
        seen = len(jobs.got)
        wait_for(lambda: len(jobs.got) >= seen + 5, 60, "jobs running on b alone")
    finally:
        got = jobs.stop()
    assert jobs.errors == []
    # The providers a held moved to b at a new generation: a is fenced out of them.
    after = fleet.store.leases()
    assert len(of_a) == 2
    assert all(after[p].generation == before[p].generation + 1 for p in of_a)
    # Within one TTL of a's last renewal, which came at most a renewal period before
    # the kill; the rest is b's poll and a loaded machine's scheduling.
    print(f"takeover {taken - killed:.2f} s after the kill (TTL {TTL} s)")
    assert taken - killed <= TTL + 2.0, f"takeover took {taken - killed:.1f} s"
    wait_for(
        lambda: settled(fleet, 4), 60, "4 ready nodes after the takeover, no strays", fleet.describe
    )
    assert len(got) == len(set(got)), "a node went to two jobs"
    assert max(fleet.handed_out().values()) == 1
    assert "lease taken" in fleet.log("b")
    # b's dashboard document shows who drives what.
    url = fleet.api_url("b")
    assert url is not None
    shown = {
        launcher["id"]: sorted(lease["provider"] for lease in launcher["leases"])
        for launcher in httpx.get(f"{url}/status", timeout=30).json()["launchers"]
    }
    assert shown == {"a": [], "b": fleet.clouds}


def test_min_ready_is_met_once_for_the_whole_fleet(make_fleet: type[Fleet]) -> None:
    fleet = make_fleet(2, "min-ready: 3")
    fleet.start("a")
    fleet.start("b")
    wait_for(lambda: sorted(fleet.owners().values()) == ["a", "b"], 60, "one provider each")
    wait_for(lambda: settled(fleet, 3), 60, "3 ready nodes")
    # Quiet for a few passes of both: nobody launches the shortfall a second time.
    time.sleep(TTL / 2)
    assert fleet.launched() == 3
    assert settled(fleet, 3)


def test_four_launchers_racing_for_the_last_slot_make_one_node(make_fleet: type[Fleet]) -> None:
    fleet = make_fleet(4, "min-ready: 4, max-nodes: 1")
    for name in "abcd":
        fleet.start(name)
    wait_for(lambda: sorted(fleet.owners().values()) == list("abcd"), 60, "one provider each")
    wait_for(lambda: settled(fleet, 1), 60, "the one node ready")
    time.sleep(TTL / 2)
    assert fleet.launched() == 1
    assert settled(fleet, 1)


def test_a_config_reload_keeps_the_launchers_leases(make_fleet: type[Fleet]) -> None:
    """A reload restarts serve's launcher in its process: it takes its own leases
    straight back at the same generation, so no provider changes hands (the whole
    fleet used to pass a reloading launcher's providers round and back). The TTL is
    the default's: a restart on a loaded machine can take longer than the short one
    the other tests use, and then the leases rightly expire."""
    fleet = make_fleet(4, "min-ready: 2", ttl=15.0)
    fleet.start("a")
    fleet.start("b")
    wait_for(lambda: sorted(Counter(fleet.owners().values()).values()) == [2, 2], 60, "a 2/2 split")
    wait_for(lambda: settled(fleet, 2), 60, "2 ready nodes")
    before = fleet.store.leases()
    takes = len(fleet.store.lease_history())
    path = fleet.root / "a.yaml"
    path.write_text(path.read_text().replace("min-ready: 2", "min-ready: 3"))
    reload = subprocess.run(
        [sys.executable, "-m", "freshpool", "config", "reload", "-c", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert reload.returncode == 0, reload.stdout + reload.stderr
    wait_for(lambda: settled(fleet, 3), 60, "3 ready nodes on the new config", fleet.describe)
    after = fleet.store.leases()
    assert {p: (x.owner, x.generation) for p, x in after.items()} == {
        p: (x.owner, x.generation) for p, x in before.items()
    }
    # The history shows a's own takes again, never one from another launcher.
    retaken = fleet.store.lease_history()[takes:]
    assert retaken and all(owner == previous == "a" for _p, owner, _g, _at, previous in retaken)
