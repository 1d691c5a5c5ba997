"""The API's process beside the launcher: replaced when it dies, gone when serve is."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from freshpool import serve
from tests.api.conftest import Served, wait_for


def test_a_dead_api_process_is_replaced_and_nothing_is_handed_twice(
    serve_pool: Callable[..., Served],
) -> None:
    served = serve_pool(min_ready=2, max_nodes=3)
    served.wait_ready(2)
    assert isinstance(served.running, serve.Running)
    front = served.running.api
    api = served.client("team-a")
    first = api.post("/requests", params={"wait": 60}, json={"labels": ["debian"]}).json()
    assert first["state"] == "fulfilled"
    dead = front.process
    assert dead is not None
    os.kill(dead.pid, signal.SIGKILL)
    # A new client: the old one's kept-alive connection died with the process. Its
    # connection waits in the listening socket's queue, which serve holds, until the
    # replacement takes it.
    again = served.client("team-a")
    second = again.post("/requests", params={"wait": 60}, json={"labels": ["debian"]}).json()
    assert second["state"] == "fulfilled"
    assert front.process is not None and front.process.pid != dead.pid
    assert not dead.is_alive()
    assert {n["id"] for n in first["nodes"]}.isdisjoint(n["id"] for n in second["nodes"])
    # The new one is told the launcher's passes: released nodes go, the pool refills.
    for got in (first, second):
        for node in got["nodes"]:
            assert again.post(f"/nodes/{node['id']}/release").status_code == 200
    held = {n["id"] for got in (first, second) for n in got["nodes"]}
    wait_for(
        lambda: not held & {n.id for n in served.pool.store.nodes()},
        90,
        "the released nodes to be deleted",
    )
    served.wait_ready(2)


def test_the_api_process_stops_with_serve(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=0)
    assert isinstance(served.running, serve.Running)
    process = served.running.api.process
    assert process is not None and process.is_alive()
    served.running.stop()
    assert not process.is_alive() and process.exitcode == 0
    assert not (served.pool.config.state_dir / serve.URL_FILE).exists()
