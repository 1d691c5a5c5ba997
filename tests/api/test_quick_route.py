"""POST /requests' quick path answers every call exactly as FastAPI's own handling does.

Two apps, each on a real store with a running scheduler, get the same calls: one
is what the API server runs (the quick path in front of FastAPI), the other
FastAPI's app alone. Their answers must be the
same for well-formed calls and for each kind of bad one. The well-formed calls
must also be answered by the quick path itself: if it silently stopped applying
(a FastAPI upgrade, a changed model), hand-outs would get slow with no error.

The apps are called over ASGI in this process (httpx's ASGITransport), not through
a socket: the HTTP server is not what is compared here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from freshpool.api.app import create_app, served_app
from freshpool.api.front import Front, start_front
from freshpool.api.quick import QuickCalls
from freshpool.config import parse
from freshpool.core.states import NodeState
from freshpool.service import tokens
from freshpool.store import Store

N = NodeState
TENANTS = ("team-a", "ops")
# Values that differ between two stores for the same call (times, the cluster's
# names and paths), left out of the comparison.
PER_STORE = {"created_at", "state_at", "ready_at", "fulfilled_at", "deadline", "hostname"}


@dataclass
class Served:
    app: ASGIApp
    front: Front
    secrets: dict[str, str]
    # For each call the quick path saw: whether it answered (or raised) itself.
    answered: list[bool] = field(default_factory=list)


def _serve(state: Path, with_quick: bool) -> Served:
    config = parse(f"""
state-dir: {state}
providers: [{{name: local, max-nodes: 4}}]
labels:
  - {{name: debian, image: img, min-ready: 0}}
  - {{name: compute, image: img, min-ready: 0}}
images: [{{name: img}}]
api: {{port: 0, admin-tenants: [ops]}}
""")
    store = Store.open(state)
    for label in ("debian", "debian", "compute"):
        node = store.new_node(label, "local", "test", "img")
        store.transition(node.id, N.BUILDING, N.TESTING, "test")
        store.transition(node.id, N.TESTING, N.READY, "test")
    front = start_front(config, store, None, wake=lambda: None)
    front.after_launcher_pass()
    served = Served(
        # What the API server runs, or FastAPI's app alone.
        app=served_app(front.services) if with_quick else create_app(front.services),
        front=front,
        secrets={t: tokens.create(store, t)[1] for t in TENANTS},
    )
    if isinstance(served.app, QuickCalls):
        assert list(served.app.quick) == [("POST", "/requests")]
        quick = served.app.quick[("POST", "/requests")]

        async def spy(request: Any) -> Any:
            try:
                answer = await quick(request)
            except Exception:
                served.answered.append(True)
                raise
            served.answered.append(answer is not None)
            return answer

        served.app.quick[("POST", "/requests")] = spy
    return served


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[Served, Served]]:
    quick = _serve(tmp_path / "quick", True)
    full = _serve(tmp_path / "full", False)
    yield quick, full
    for served in (quick, full):
        served.front.stop()
        served.front.services.store.close()


@dataclass
class Call:
    body: bytes | dict[str, Any] | None
    query: str = ""
    auth: str = "Bearer {team-a}"
    content_type: str | None = "application/json"


WELL_FORMED = [
    Call({"labels": ["debian"]}),
    Call({"labels": ["debian", "compute"], "requestor": "job 1", "priority": 5}, "wait=0"),
    Call({"labels": ["debian"], "timeout": 30, "tenant": "team-a"}, "wait=0.05"),
    Call({"labels": ["compute"], "priority": 2.0}, content_type="application/json; charset=utf-8"),
    Call({"labels": ["debian"]}, content_type="Application/JSON"),
    Call({"labels": ["debian"]}, auth="bearer {team-a}"),
    Call({"labels": ["debian"]}, auth="Bearer {team-a}  "),
    Call({"labels": ["debian"], "tenant": "team-b"}, auth="Bearer {ops}"),
    Call(b'{"labels": ["nope"], "labels": ["debian"]}'),
]
# FastAPI answers these (errors, and forms the quick path leaves to it).
OTHERS = [
    Call({"labels": ["debian"]}, "wait=abc"),
    Call({"labels": ["debian"]}, "wait=-1"),
    Call({"labels": ["debian"]}, "wait=nan"),
    Call({"labels": ["debian"]}, "wait=inf"),
    Call({"labels": ["debian"]}, "wait="),
    Call({"labels": ["debian"]}, "wiat=3"),
    Call({"labels": ["debian"]}, "wait=0&wait=x"),
    Call({"labels": ["debian"]}, "wait=x&wait=0"),
    Call({"labels": ["debian"]}, auth=""),
    Call({"labels": ["debian"]}, auth="Bearer"),
    Call({"labels": ["debian"]}, auth="Basic {team-a}"),
    Call({"labels": ["debian"]}, auth="Bearer fp_nope"),
    Call({"labels": ["nope"]}, auth=""),
    Call({"labels": ["debian"]}, content_type=None),
    Call({"labels": ["debian"]}, content_type="text/plain"),
    Call({"labels": ["debian"]}, content_type="application/vnd.freshpool+json"),
    Call(b"{not json"),
    Call(b""),
    Call(b"[]"),
    Call(b'{"labels": ["debian"], "timeout": NaN}'),
    Call({"labels": ["nope"]}),
    Call({"labels": ["debian"] * 5}),
    Call({"labels": ["debian"], "priority": "3"}),
    Call({"labels": ["debian"], "priority": True}),
    Call({"labels": ["debian"], "colour": "red"}),
    Call({"labels": ["debian"], "tenant": "Not A Name"}),
]
FORBIDDEN = Call({"labels": ["debian"], "tenant": "team-b"})


async def _send(served: Served, call: Call) -> dict[str, Any]:
    headers = {}
    if call.auth:
        headers["authorization"] = call.auth.format_map(served.secrets)
    if call.content_type is not None:
        headers["content-type"] = call.content_type
    body = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    transport = httpx.ASGITransport(app=served.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        got = await client.post(f"/requests?{call.query}", content=body, headers=headers)
    return {
        "status": got.status_code,
        "headers": {k: got.headers.get(k) for k in ("location", "www-authenticate")},
        "body": _comparable(got.json()),
    }


def _comparable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in PER_STORE}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, str) and "/" in value and value.startswith("/"):
        return "<path>"
    return value


def test_quick_path_answers_as_fastapi_does(apps: tuple[Served, Served]) -> None:
    quick, full = apps

    async def both(call: Call) -> tuple[dict[str, Any], dict[str, Any], bool]:
        seen = len(quick.answered)
        mine, theirs = await _send(quick, call), await _send(full, call)
        return mine, theirs, any(quick.answered[seen:])

    async def run() -> None:
        for call in WELL_FORMED:
            mine, theirs, answered = await both(call)
            assert mine == theirs, call
            assert mine["status"] == 201, (call, mine)
            assert answered, f"the quick path left a well-formed call to FastAPI: {call}"
        for call in OTHERS:
            mine, theirs, _ = await both(call)
            assert mine == theirs, call
        mine, theirs, answered = await both(FORBIDDEN)
        assert mine == theirs and mine["status"] == 403 and answered

    asyncio.run(run())
    # The first calls were handed the ready nodes, in the same order on both.
    for served in apps:
        store = served.front.services.store
        assert store.nodes(["ready"]) == []
    statuses = [r.state for r in quick.front.services.store.list_requests(limit=1000)]
    assert statuses.count("fulfilled") == 2, statuses
