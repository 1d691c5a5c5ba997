"""How every integration talks to its CI server: against a real HTTP server on loopback
that answers what a busy, broken or refusing CI server answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freshpool.integrations.ciserver import CiServer, CiServerError


class Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers) of the server's script."""

    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, ScriptedServer)
        status, headers = server.script.pop(0) if server.script else (200, {})
        server.seen.append(self.path)
        body = b'{"ok": true}' if status == 200 else b"busy"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class ScriptedServer(ThreadingHTTPServer):
    script: list[tuple[int, dict[str, str]]]
    seen: list[str]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    httpd = ScriptedServer(("127.0.0.1", 0), Scripted)
    httpd.script, httpd.seen = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(server: ScriptedServer, waits: list[float], tries: int = 6) -> CiServer:
    host, port = server.server_address[:2]
    return CiServer("test", f"http://{host!s}:{port}", tries=tries, sleep=waits.append)


def test_a_failing_server_is_retried_with_the_backoff_and_its_retry_after(
    server: ScriptedServer,
) -> None:
    server.script = [(503, {}), (429, {"Retry-After": "7"}), (502, {})]
    waits: list[float] = []
    ci = _client(server, waits)
    assert ci.json("GET", "/queue") == {"ok": True}
    assert len(server.seen) == 4
    # The backoff's first waits are under a second; the server's 7 s is honoured.
    assert waits[0] <= 0.5 and waits[1] == 7 and waits[2] <= 2
    assert ci.health.as_dict()["healthy"] and ci.health.retries == 3


def test_a_spent_rate_limit_waits_for_its_reset(server: ScriptedServer) -> None:
    import time

    reset = str(int(time.time()) + 30)
    server.script = [(403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset})]
    waits: list[float] = []
    # A 403 that is a spent rate limit is retried after the reset, unlike a plain 403.
    assert _client(server, waits).json("GET", "/runners") == {"ok": True}
    assert len(waits) == 1 and 25 <= waits[0] <= 30


def test_a_refusal_is_not_retried_and_a_dead_server_is_shown_unhealthy(
    server: ScriptedServer,
) -> None:
    server.script = [(401, {})]
    waits: list[float] = []
    with pytest.raises(CiServerError) as refused:
        _client(server, waits).call("GET", "/me")
    assert refused.value.status == 401 and not refused.value.transient and waits == []
    dead = CiServer("test", "http://127.0.0.1:9", tries=3, sleep=waits.append)
    with pytest.raises(CiServerError) as down:
        dead.call("GET", "/me")
    assert down.value.status is None and len(waits) == 2
    health = dead.health.as_dict()
    assert not health["healthy"] and "cannot reach" in health["error"]
