"""On PostgreSQL, whoever waits for the store wakes on another process's commit
(NOTIFY), with no timer of its own that could have woken it instead: the launcher's
Runner, and an API server's scheduler (`serve --api-only` has no link to a launcher)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.api.server import bind
from freshpool.config import Config, parse
from freshpool.core.states import NodeState, RequestState
from freshpool.launcher.runner import Runner
from freshpool.serve.apiprocess import Serving
from freshpool.store import Store
from tests.launcher.fleet import wait_for
from tests.store.pg import TempPostgres

# Longer than any test waits: a pass or a hand-out within a test came from a wake-up.
NEVER = 3600.0


@pytest.fixture
def url(postgres: TempPostgres) -> str:
    return postgres.new_database()


@pytest.fixture
def elsewhere(url: str) -> Iterator[Store]:
    """The store as another process has it: an engine (and connections) of its own."""
    other = Store(url)
    yield other
    other.close()


class Counting:
    name = "counting"

    def __init__(self) -> None:
        self.passes = 0

    def start(self) -> None:
        return None

    def tick(self) -> None:
        self.passes += 1

    def due(self) -> float:
        return float("inf")

    def stop(self, deadline: float) -> None:
        return None


def test_the_launcher_passes_when_another_process_queues_a_request(
    url: str, elsewhere: Store
) -> None:
    store = Store(url)
    counting = Counting()
    runner = Runner(store, [counting], interval=NEVER)
    stop = threading.Event()
    thread = threading.Thread(target=runner.drive, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: counting.passes == 1, 30, "the first pass")
        elsewhere.new_request(["debian"], requestor="job")
        wait_for(lambda: counting.passes == 2, 30, "a pass on the NOTIFY")
    finally:
        stop.set()
        runner.wake()
        thread.join(30)
        store.close()


def config(tmp_path: Path, url: str) -> Config:
    return parse(
        f"state-dir: {tmp_path}\ndatabase-url: '{url}'\ninterval: {NEVER}\n"
        "api: {port: 0}\nimages: [{name: img}]\n"
        "providers: [{name: p, driver: sim}]\nlabels: [{name: debian, image: img}]\n",
        "c.yaml",
    )


def test_an_api_servers_scheduler_hands_out_a_node_made_ready_elsewhere(
    tmp_path: Path, url: str, elsewhere: Store
) -> None:
    store = Store(url)
    listener = bind("127.0.0.1", 0)
    # As `serve --api-only` runs it: nothing to tell a launcher, nobody to tell it.
    serving = Serving(config(tmp_path, url), store, listener, wake=lambda: None)
    try:
        serving.scheduler.launcher_passed()
        request = elsewhere.new_request(["debian"], requestor="job")
        node = elsewhere.new_node("debian", "p", "b1", "fp-debian")
        elsewhere.transition(node.id, NodeState.BUILDING, NodeState.TESTING, "created")
        elsewhere.transition(node.id, NodeState.TESTING, NodeState.READY, "tested")
        wait_for(
            lambda: elsewhere.request(request.id).state == RequestState.FULFILLED,
            30,
            "the request served by the scheduler, woken by NOTIFY",
        )
        assert elsewhere.node(node.id).request_id == request.id
    finally:
        serving.stop()
        listener.close()
        store.close()
