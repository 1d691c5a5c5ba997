"""Buildbot end to end: a real master (SQLite), real buildbot-worker processes on real
freshpool nodes, over PB from the node to the master on the bridge, nothing emulated."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.integrations.buildbot.harness import Master, ServedPool, as_json, wait_for

SUCCESS, FAILURE = 0, 2


def test_each_build_runs_on_a_fresh_node_that_is_destroyed_after(
    pool: ServedPool, master: Callable[..., Master]
) -> None:
    m = master(workers=3)
    requests = [m.force(fail="3" if i == 4 else "0") for i in range(6)]
    builds = wait_for(lambda: m.finished(requests), 300, "six builds")
    assert [b["results"] for b in builds] == [SUCCESS] * 4 + [FAILURE] + [SUCCESS], as_json(builds)
    hostnames = [m.output_of(b, "hostname").strip() for b in builds]
    # Six builds on three workers: every build on a node of its own, never one used before.
    assert len(set(hostnames)) == 6, hostnames
    for build in builds:
        assert m.output_of(build, "fresh").strip() == "", m.log_of(build, "fresh")
    # The failing build failed in its last step, not in the worker's life.
    failed = builds[4]
    assert "exit 3" in failed["state_string"] or "failed" in failed["state_string"], failed

    # Every node a build used is gone (or going); none went back to ready.
    def gone() -> bool:
        left = {n.hostname: n.state for n in pool.store.nodes() if n.hostname in hostnames}
        return all(state in ("deleting",) for state in left.values())

    wait_for(gone, 120, "the builds' nodes deleted")


def test_a_worker_that_dies_before_connecting_fails_fast_and_its_node_goes(
    pool: ServedPool, master: Callable[..., Master]
) -> None:
    # `false` in place of python: the worker process exits at once on its node.
    m = master(workers=1, python="false", check_instance_interval=1)
    m.force()
    log = m.basedir / "twistd.log"
    wait_for(lambda: "the worker process on node" in log.read_text(), 60, "check_instance's report")
    said = log.read_text()
    assert "latent worker crashed before connecting" in said, said[-3000:]
    taken = {int(n) for n in re.findall(r"the worker process on node (\d+) exited", said)}
    assert taken
    # Each node it took is destroyed, never put back: no row, or deleting.
    wait_for(
        lambda: all(n.state == "deleting" for n in pool.store.nodes() if n.id in taken),
        60,
        "the dead worker's nodes deleted",
    )
    # No build ran: one that ended did so as Buildbot's EXCEPTION (4) or RETRY (5).
    ended = m.get("builds", complete="true")
    assert all(b["results"] in (4, 5) for b in ended), ended
