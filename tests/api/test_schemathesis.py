"""Schemathesis against the OpenAPI spec of the real app on a real store: no 5xx, spec kept.

The pool here has no driver: its ready nodes are store rows made through the store
API, so the fuzzer can hand them out, hold, release and delete them quickly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from freshpool import launcher as launching
from freshpool.api import tokens
from freshpool.api.server import bind, url_of
from freshpool.config import parse
from freshpool.core.states import NodeState
from freshpool.serve.apiprocess import Serving
from freshpool.store import Store

N = NodeState


@pytest.fixture(scope="module")
def served_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = Path(tmp_path_factory.mktemp("fuzzed"))
    config = parse(f"""
state-dir: {state}
interval: 0.2
providers: [{{name: local, max-nodes: 50}}]
labels:
  - {{name: debian, image: img, min-ready: 0}}
  - {{name: compute, image: img, min-ready: 0}}
images: [{{name: img}}]
api: {{port: 0, admin-tenants: [ops]}}
tenants: [{{name: ops, weight: 2}}]
""")
    store = Store.open(state)
    for i in range(30):
        row = store.new_node("debian" if i % 2 else "compute", "local", "b", "n")
        store.transition(row.id, N.BUILDING, N.TESTING, "up")
        store.transition(row.id, N.TESTING, N.READY, "ok")
    launcher = launching.build(config, store, {}, images=False, publish=False)
    # The API in this process, so its long-polls and event streams can be kept short
    # (the fuzzer tries the largest waits).
    listener = bind("127.0.0.1", 0)
    running = Serving(config, store, listener, launcher.wake)
    running.services.max_wait = 0.2
    running.services.max_stream = 0.2
    launcher.after_pass.append(running.scheduler.launcher_passed)
    stop = threading.Event()
    thread = threading.Thread(target=launcher.run, args=(stop,), daemon=True)
    thread.start()
    _token["secret"] = tokens.create(store, "ops")[1]
    try:
        yield {"url": url_of(listener)}
    finally:
        stop.set()
        thread.join(timeout=30)
        running.stop()
        store.close()


@pytest.fixture(scope="module")
def api_schema(served_api: dict[str, Any]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served_api['url']}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
_token: dict[str, str] = {}


@schema.auth()
class AdminToken:
    """An admin tenant's token, so every operation is reached, not only refused.

    Given as an auth provider (not a fixed header) so schemathesis can still leave it
    out when it checks that a missing token is refused.
    """

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return _token["secret"]

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_answers_every_input_without_server_errors(
    case: schemathesis.Case, served_api: dict[str, Any]
) -> None:
    # Every schemathesis check: no 5xx, responses as documented, bad input refused
    # (4xx), valid input accepted, a missing token refused.
    case.call_and_validate(timeout=30)
