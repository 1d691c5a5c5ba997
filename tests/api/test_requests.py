"""Node-set requests over real HTTP with real local nodes: hand-over, waiting, deadline, cancel."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from freshpool.drivers import ssh
from freshpool.drivers.base import SshAccess
from freshpool.serve.apiprocess import Serving
from tests.api.conftest import Served, wait_for

COMPUTE = """
  - name: compute
    image: debian-bookworm
    min-ready: 0
"""


def test_node_set_is_handed_over_whole_and_released_together(
    serve_pool: Callable[..., Served],
) -> None:
    served = serve_pool(min_ready=1, max_nodes=6, extra_label=COMPUTE)
    api = served.client("team-a")
    got = api.post(
        "/requests",
        params={"wait": 60},
        json={"labels": ["debian", "compute", "compute"], "requestor": "job-1", "priority": 3},
    )
    assert got.status_code == 201, got.text
    request = got.json()
    assert request["state"] == "fulfilled", request
    assert request["tenant"] == "team-a" and request["priority"] == 3
    nodes = request["nodes"]
    assert sorted(n["label"] for n in nodes) == ["compute", "compute", "debian"]
    assert len({n["id"] for n in nodes}) == 3
    assert {n["provider"] for n in nodes} == {request["provider"]}
    assert all(n["state"] == "in-use" and n["tenant"] == "team-a" for n in nodes)

    # The job reaches a node with what the API handed over.
    first = nodes[0]
    access = {k: v for k, v in first["access"].items() if k != "ssh"}
    result = ssh.run(SshAccess(**access), "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == first["hostname"]

    started = api.post(f"/nodes/{first['id']}/in-use", json={"job": "build 42"})
    assert started.status_code == 200, started.text
    detail = api.get(f"/nodes/{first['id']}").json()
    assert detail["state"] == "in-use" and detail["job_started_at"] is not None
    assert [e["reason"] for e in detail["events"]][-1] == "job started: build 42"
    # One node, one job: a second start is refused.
    again = api.post(f"/nodes/{first['id']}/in-use")
    assert again.status_code == 409 and "used once" in again.json()["detail"]

    released = api.post(f"/nodes/{nodes[1]['id']}/release")
    assert released.status_code == 200, released.text
    assert sorted(n["id"] for n in released.json()) == sorted(n["id"] for n in nodes)
    assert {n["state"] for n in released.json()} == {"used"}
    ids = {n["id"] for n in nodes}
    wait_for(lambda: not ids & {n.id for n in served.pool.store.nodes()}, 60, "deletion")
    for node_id in ids:
        steps = [(e.from_state, e.to_state) for e in served.pool.store.events(node_id)]
        assert ("in-use", "used") in steps and ("in-use", "ready") not in steps
        assert steps[-1] == ("deleting", None)


def _sse(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse a text/event-stream body into events."""
    events, current = [], {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return events


def test_long_poll_and_server_sent_events_wake_on_fulfilment(
    serve_pool: Callable[..., Served],
) -> None:
    # Nothing ready: the request waits while the launcher starts a node for it.
    served = serve_pool(min_ready=0, max_nodes=2)
    api = served.client("team-a")
    created = api.post("/requests", json={"labels": ["debian"]})
    assert created.status_code == 201 and created.json()["state"] == "pending"
    request_id = created.json()["id"]
    streamed: list[dict[str, Any]] = []
    polled: dict[str, Any] = {}

    def stream() -> None:
        with api.stream("GET", f"/requests/{request_id}/events", params={"timeout": 120}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            streamed.extend(_sse(r))

    def long_poll() -> None:
        polled.update(api.get(f"/requests/{request_id}", params={"wait": 120}).json())

    threads = [threading.Thread(target=stream), threading.Thread(target=long_poll)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    # Both came back because the request changed, not because their waits ran out.
    assert polled["state"] == "fulfilled", polled
    assert [e["event"] for e in streamed] == ["pending", "fulfilled"], streamed
    last = json.loads(streamed[-1]["data"])
    assert last["id"] == request_id and len(last["nodes"]) == 1
    assert last["nodes"][0]["id"] == polled["nodes"][0]["id"]


def test_request_past_its_deadline_fails_with_a_reason(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=1, max_nodes=1)
    served.wait_ready(1)
    api = served.client("team-a")
    taken = api.post("/requests", params={"wait": 30}, json={"labels": ["debian"]}).json()
    assert taken["state"] == "fulfilled"
    # The one node allowed is in use, so nothing can serve this before its deadline.
    late = api.post("/requests", params={"wait": 60}, json={"labels": ["debian"], "timeout": 1})
    body = late.json()
    assert body["state"] == "failed", body
    assert "deadline" in body["reason"] and body["nodes"] == []


def test_cancel_pending_and_fulfilled_requests(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=1, max_nodes=1)
    served.wait_ready(1)
    api = served.client("team-a")
    held = api.post("/requests", params={"wait": 30}, json={"labels": ["debian"]}).json()
    assert held["state"] == "fulfilled"
    (node,) = held["nodes"]
    waiting = api.post("/requests", json={"labels": ["debian"]}).json()
    assert waiting["state"] == "pending"

    cancelled = api.delete(f"/requests/{waiting['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["nodes"] == []
    # Cancelling again changes nothing.
    assert api.delete(f"/requests/{waiting['id']}").json()["state"] == "cancelled"

    gone = api.delete(f"/requests/{held['id']}").json()
    assert gone["state"] == "cancelled"
    assert [n["state"] for n in gone["nodes"]] == ["deleting"]
    wait_for(lambda: node["id"] not in {n.id for n in served.pool.store.nodes()}, 60, "delete")
    steps = [e.to_state for e in served.pool.store.events(node["id"])]
    assert steps[steps.index("in-use") :] == ["in-use", "deleting", None]
    # The freed room refills with a new node, never the cancelled one.
    served.wait_ready(1)
    assert node["id"] not in {n.id for n in served.pool.store.nodes(["ready"])}
    assert api.delete("/requests/999999").status_code == 404


def test_tokens_scope_a_tenant_to_its_own_requests_and_nodes(
    serve_pool: Callable[..., Served],
) -> None:
    served = serve_pool(min_ready=2, max_nodes=4)
    served.wait_ready(2)
    a, b, admin, nobody = (
        served.client("team-a"),
        served.client("team-b"),
        served.client("ops"),
        served.client(),
    )
    mine = a.post("/requests", params={"wait": 30}, json={"labels": ["debian"]}).json()
    (node,) = mine["nodes"]
    assert node["access"] is not None
    node_id = node["id"]

    # Tenant b cannot see, start, release, hold or delete tenant a's node or request.
    assert b.get(f"/nodes/{node_id}").status_code == 404
    assert node_id not in {n["id"] for n in b.get("/nodes").json()}
    assert b.post(f"/nodes/{node_id}/release").status_code == 404
    assert b.post(f"/nodes/{node_id}/in-use").status_code == 404
    assert b.post(f"/nodes/{node_id}/hold").status_code == 404
    assert b.delete(f"/nodes/{node_id}").status_code == 404
    assert b.get(f"/requests/{mine['id']}").status_code == 404
    assert b.delete(f"/requests/{mine['id']}").status_code == 404
    assert mine["id"] not in {r["id"] for r in b.get("/requests").json()}
    # Nodes not handed out belong to no tenant: only an admin may act on them.
    ready = served.pool.store.nodes(["ready"])[0]
    assert b.delete(f"/nodes/{ready.id}").status_code == 404
    forged = b.post("/requests", json={"labels": ["debian"], "tenant": "team-a"})
    assert forged.status_code == 403
    assert served.pool.store.node(node_id).state == "in-use"

    # Without a token: open status shows the node but never how to reach it; no changes.
    seen = nobody.get(f"/nodes/{node_id}").json()
    assert seen["state"] == "in-use" and seen["access"] is None
    assert nobody.post(f"/nodes/{node_id}/release").status_code == 401
    assert nobody.post("/requests", json={"labels": ["debian"]}).status_code == 401
    bad = httpx.post(
        f"{served.url}/nodes/{node_id}/release", headers={"Authorization": "Bearer fp_nope"}
    )
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"

    # Only a hash of each token is stored.
    rows = served.pool.store.tokens()
    assert all(row.digest != secret for row in rows for secret in served.secrets.values())
    assert all(secret not in row.digest for row in rows for secret in served.secrets.values())

    # The owner and an admin tenant's token may act on it.
    assert admin.get(f"/nodes/{node_id}").json()["access"] is not None
    released = a.post(f"/nodes/{node_id}/release")
    assert released.status_code == 200 and released.json()[0]["state"] == "used"
    assert a.post(f"/nodes/{node_id}/release").status_code == 409
    assert admin.post(f"/nodes/{ready.id}/hold", json={"reason": "look"}).json()["state"] == "hold"


def test_closed_status_needs_a_token_to_read(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=0, api="open-status: false")
    assert served.client().get("/nodes").status_code == 401
    assert served.client().get("/status").status_code == 401
    assert served.client("team-a").get("/nodes").status_code == 200
    # Health and metrics stay open for probes and scrapers.
    assert served.client().get("/healthz").json() == {"ok": True, "detail": ""}
    assert served.client().get("/metrics").status_code == 200


def test_bad_input_gets_field_level_errors(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=0, max_nodes=2)
    api = served.client("team-a")

    def problems(response: httpx.Response) -> dict[tuple[Any, ...], str]:
        assert response.status_code == 422, response.text
        return {tuple(p["loc"]): p["msg"] for p in response.json()["detail"]}

    found = problems(api.post("/requests", json={"labels": ["debian", "nope"]}))
    assert found == {("body", "labels", 1): "unknown label 'nope' (known: debian)"}
    # Priority is an integer, never a string compared as text.
    found = problems(api.post("/requests", json={"labels": ["debian"], "priority": "high"}))
    assert ("body", "priority") in found
    found = problems(api.post("/requests", json={"labels": [], "colour": "red"}))
    assert set(found) == {("body", "labels"), ("body", "colour")}
    found = problems(api.post("/requests", json={"labels": ["debian"] * 3}))
    assert "at most 2 items" in found[("body", "labels")]
    found = problems(api.post("/requests", json={"labels": ["debian"], "timeout": -1}))
    assert ("body", "timeout") in found
    assert ("path", "node_id") in problems(api.get("/nodes/0"))
    assert ("query", "wait") in problems(api.get("/requests/1", params={"wait": -5}))
    assert ("query", "state") in problems(api.get("/nodes", params={"state": "sleepy"}))
    broken = api.post(
        "/requests", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    # `curl -d` sends a form, not JSON: the answer says what to send.
    form = problems(api.post("/requests", data={"labels": "debian"}))
    assert "must be JSON with Content-Type: application/json" in form[("body",)]
    assert api.get("/nodes/12345").status_code == 404
    assert api.get("/nodes/12345").json() == {"detail": "no node 12345"}


def test_a_failing_store_is_a_503_that_loses_nothing(
    serve_pool: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection (the database is made to fail one hand-out; nothing else is faked)."""
    from sqlalchemy.exc import OperationalError

    served = serve_pool(min_ready=1, max_nodes=1, here=True)
    served.wait_ready(1)
    assert isinstance(served.running, Serving)
    store = served.running.scheduler.store
    real = store.hand_out

    def full_disk(new: list[Any], *args: Any) -> Any:
        if not new:  # the scheduler's passes with nothing submitted go through
            return real(new, *args)
        monkeypatch.setattr(store, "hand_out", real)  # fail once
        raise OperationalError("INSERT INTO requests", {}, Exception("database or disk is full"))

    monkeypatch.setattr(store, "hand_out", full_disk)
    api = served.client("team-a")
    failed = api.post("/requests", params={"wait": 30}, json={"labels": ["debian"]})
    assert failed.status_code == 503, failed.text
    assert "database or disk is full" in failed.json()["detail"]
    assert failed.headers["Retry-After"] == "1"
    assert store.list_requests() == [] and len(store.nodes(["ready"])) == 1
    again = api.post("/requests", params={"wait": 30}, json={"labels": ["debian"]}).json()
    assert again["state"] == "fulfilled" and len(again["nodes"]) == 1
