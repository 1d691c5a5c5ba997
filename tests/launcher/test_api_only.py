"""`serve --api-only` beside a launcher on one PostgreSQL: two API servers and one
launcher, real processes. Hand-outs through both servers at once give no node to two
requests and fulfil each request once; a request on one server wakes the launcher
through the store's NOTIFY; a long-poll on one wakes when a node is released on the
other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from freshpool.api import tokens
from freshpool.api.client import ApiClient
from freshpool.serve import apionly
from tests.api.browser import ARTIFACTS, needs_chromium, page_at
from tests.launcher.fleet import Fleet, wait_for
from tests.store.pg import TempPostgres

TTL = 4.0
# A quiet launcher's lease TTL: its lease controller then passes every minute, so
# within a test only a wake-up (NOTIFY) makes it pass.
QUIET_TTL = 600.0


@pytest.fixture
def fleet_of(tmp_path: Path, postgres: TempPostgres) -> Iterator[type[Fleet]]:
    made: list[Fleet] = []

    class Made(Fleet):
        def __init__(self, label: str, ttl: float = TTL) -> None:
            super().__init__(tmp_path, postgres.new_database(), 2, label, ttl)
            made.append(self)

    yield Made
    for fleet in made:
        fleet.stop()


def api_servers(fleet: Fleet, *names: str) -> list[ApiClient]:
    for name in names:
        fleet.start_api(name)
    for name in names:
        wait_for(lambda n=name: fleet.api_url(n) is not None, 60, f"{name} listening",
                 lambda n=name: fleet.log(n))  # fmt: skip
    # One tenant's token, good on every server: tokens live in the shared database.
    _, secret = tokens.create(fleet.store, "ci")
    return [ApiClient(fleet.api_url(name) or "", secret) for name in names]


def handed(fleet: Fleet) -> Counter[int]:
    """Request id -> how many node hand-outs its history shows."""
    with fleet.store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT reason FROM node_events WHERE to_state = 'in-use'")
        ).scalars()
        return Counter(int(reason.rsplit(" ", 1)[1]) for reason in rows)


def test_two_api_servers_never_hand_one_node_twice_nor_fulfil_a_request_twice(
    fleet_of: type[Fleet],
) -> None:
    fleet = fleet_of("min-ready: 6")
    fleet.start("launcher")
    a, b = api_servers(fleet, "a", "b")
    wait_for(lambda: len(fleet.store.nodes(["ready"])) >= 6, 60, "6 ready nodes")
    got: list[tuple[int, int]] = []  # (request, node) as each client was told
    errors: list[str] = []

    def client(i: int) -> None:
        asks, gives = (a, b) if i % 2 else (b, a)
        for _ in range(6):
            try:
                (node,) = asks.request_nodes(["debian"], timeout=60, requestor=f"job-{i}")
                assert node.request_id is not None
                got.append((node.request_id, node.id))
                # Released through the other server: its release must reach the
                # launcher (NOTIFY) for the pool to refill.
                gives.release(node.id)
            except Exception as exc:
                errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        a.close()
        b.close()
    assert errors == []
    assert len(got) == 72
    nodes = [node for _, node in got]
    requests = [request for request, _ in got]
    assert len(set(nodes)) == len(nodes), "a node went to two requests"
    assert len(set(requests)) == len(requests), "a request was answered twice"
    assert max(fleet.handed_out().values()) == 1, "a node went to a job twice"
    # Each request's history: one node handed to it, once, whichever server did it.
    history = handed(fleet)
    assert all(history[r] == 1 for r in requests), history
    assert all(fleet.store.request(r).state == "fulfilled" for r in requests)


def test_a_request_on_one_api_server_wakes_the_launcher_and_is_fulfilled(
    fleet_of: type[Fleet],
) -> None:
    # No warm pool: the node exists only if the launcher hears of the request. Its
    # own timers are an hour and a minute away, so only the NOTIFY can wake it.
    fleet = fleet_of("min-ready: 0", ttl=QUIET_TTL)
    fleet.start("launcher", quiet=True)
    (a,) = api_servers(fleet, "a")
    wait_for(lambda: bool(fleet.store.live_launchers(QUIET_TTL)), 60, "the launcher up")
    wait_for(lambda: "lease taken" in fleet.log("launcher"), 60, "leases taken")
    try:
        (node,) = a.request_nodes(["debian"], timeout=30, requestor="job")
    finally:
        a.close()
    assert fleet.store.node(node.id).state == "in-use"
    assert fleet.launched() == 1


def test_a_long_poll_on_one_api_server_wakes_when_a_node_is_released_on_the_other(
    fleet_of: type[Fleet],
) -> None:
    fleet = fleet_of("min-ready: 1", ttl=QUIET_TTL)
    fleet.start("launcher", quiet=True)
    a, b = api_servers(fleet, "a", "b")
    try:
        (node,) = a.request_nodes(["debian"], timeout=60, requestor="job")
        # Quiet: the refill done, nothing changes until the release below.
        wait_for(lambda: len(fleet.store.nodes(["ready"])) == 1, 60, "the refill")
        url = fleet.api_url("b")
        first = httpx.get(f"{url}/status", timeout=30).json()
        polled: list[dict[str, object]] = []
        poll = threading.Thread(
            target=lambda: polled.append(
                httpx.get(
                    f"{url}/status", params={"since": first["version"], "wait": 60}, timeout=90
                ).json()
            )
        )
        poll.start()
        a.release(node.id)
        poll.join(120)
    finally:
        a.close()
        b.close()
    (after,) = polled
    # Woken by the change, not by the long-poll's end (which keeps the version).
    assert after["version"] != first["version"]
    shown = {n["id"]: n["state"] for n in after["nodes"]}  # type: ignore[attr-defined]
    assert shown.get(node.id) != "in-use"


@pytest.mark.sqlite_only  # the config names no database: the test mode's would be used
def test_api_only_refuses_a_file_database(tmp_path: Path) -> None:
    from freshpool.config import parse

    config = parse(
        f"state-dir: {tmp_path}\napi: {{port: 0}}\nimages: [{{name: img}}]\n"
        "providers: [{name: p, driver: sim}]\nlabels: [{name: debian, image: img}]\n",
        "c.yaml",
    )
    with pytest.raises(apionly.NotShared, match="PostgreSQL"):
        apionly.run(config, threading.Event())
    assert not (tmp_path / "api.lock").exists(), "refused before taking anything"


@needs_chromium
def test_the_dashboard_shows_each_launcher_its_leases_and_a_dead_one(
    fleet_of: type[Fleet],
) -> None:
    fleet = fleet_of("min-ready: 0")
    fleet.start("l1")
    fleet.start("l2")
    wait_for(lambda: sorted(fleet.owners().values()) == ["l1", "l2"], 60, "one provider each")
    fleet.start_api("a")
    wait_for(lambda: fleet.api_url("a") is not None, 60, "a listening", lambda: fleet.log("a"))
    fleet.kill("l2")
    problems: list[str] = []
    with page_at(f"{fleet.api_url('a')}/", problems) as page:
        page.wait_for_selector("#live.on")
        # Dead once not seen for a TTL; its provider then moves to l1.
        page.wait_for_selector("tr[data-launcher='l2'][data-live='false']", timeout=60_000)
        alive = page.locator("tr[data-launcher='l1'][data-live='true']")
        alive.wait_for(timeout=60_000)
        page.wait_for_function(
            "() => document.querySelector(\"tr[data-launcher='l1']\").innerText"
            ".includes('cloud-0') && document.querySelector(\"tr[data-launcher='l1']\")"
            ".innerText.includes('cloud-1')",
            timeout=60_000,
        )
        assert "dead" in page.locator("tr[data-launcher='l2']").inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard-launchers.png"), full_page=True)
    assert problems == []


def test_api_only_reloads_its_config_and_refuses_a_bad_one(fleet_of: type[Fleet]) -> None:
    """`freshpool config reload` (SIGHUP) on an API server: a good config is taken on
    the same address, a bad one refused with its error while the old one serves on."""
    fleet = fleet_of("min-ready: 0")
    fleet.start("launcher")
    (client,) = api_servers(fleet, "a")
    url = fleet.api_url("a")
    path = fleet.root / "a.yaml"
    good = path.read_text()

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "freshpool", "config", "reload", "-c", str(path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def labels() -> list[str]:
        return sorted(x["name"] for x in client.call("GET", "/labels"))

    assert labels() == ["debian"]
    path.write_text(good.replace("labels:\n", "labels:\n  - {name: extra, image: img}\n"))
    taken = reload()
    assert taken.returncode == 0 and "serve --api-only: taken" in taken.stdout, taken
    wait_for(lambda: fleet.api_url("a") == url and labels() == ["debian", "extra"], 60,
             "the new label served on the same address", lambda: fleet.log("a"))  # fmt: skip
    path.write_text(good.replace("labels:\n", "labels:\n  - {name: extra, image: no-such}\n"))
    refused = reload()  # checked by the command before it signals the server
    assert refused.returncode != 0 and "no image named 'no-such'" in refused.stderr, refused
    # A plain SIGHUP: the server checks the file itself and keeps its config.
    result = fleet.root / "a" / apionly.RELOAD_FILE
    result.unlink()
    os.kill(fleet.launchers["a"].pid, signal.SIGHUP)
    wait_for(result.exists, 60, "the server's answer to SIGHUP", lambda: fleet.log("a"))
    answer = json.loads(result.read_text())
    assert not answer["ok"] and "no-such" in answer["message"], answer
    assert labels() == ["debian", "extra"] and fleet.launchers["a"].poll() is None
