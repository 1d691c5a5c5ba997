"""A real pool served over real HTTP: launcher thread, scheduler, API on a free port, tokens."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from freshpool import serve
from freshpool.api import tokens
from freshpool.api.server import bind, url_of
from freshpool.launcher import Launcher
from freshpool.serve.apiprocess import Serving
from tests.support import Pool

ADMIN = "ops"


@dataclass
class Served:
    pool: Pool
    launcher: Launcher
    # The API process (`freshpool serve`'s layout), or what it runs, in this process.
    running: serve.Running | Serving
    url: str
    secrets: dict[str, str] = field(default_factory=dict)
    _clients: list[httpx.Client] = field(default_factory=list)

    def client(self, tenant: str | None = None) -> httpx.Client:
        """An HTTP client with tenant's token (made on first use), or none."""
        headers = {}
        if tenant is not None:
            if tenant not in self.secrets:
                self.secrets[tenant] = tokens.create(self.pool.store, tenant)[1]
            headers["Authorization"] = f"Bearer {self.secrets[tenant]}"
        client = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        self._clients.append(client)
        return client

    def wait_ready(self, n: int, timeout: float = 90) -> None:
        wait_for(lambda: len(self.pool.store.nodes(["ready"])) >= n, timeout, f"{n} ready nodes")


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def serve_pool(make_pool: Callable[..., Pool]) -> Iterator[Callable[..., Served]]:
    """Start a pool like `freshpool serve` does (the launcher on a thread here, the API
    process beside it); stop it after the test."""
    started: list[tuple[threading.Event, threading.Thread, Served]] = []

    def start(api: str = "", here: bool = False, **kwargs: Any) -> Served:
        """`api` adds lines to the api: section, e.g. "open-status: false".

        `here` runs the scheduler and the API in this process instead, for tests that
        reach inside them.
        """
        extra = kwargs.pop("extra", "")
        api = f"api:\n  port: 0\n  admin-tenants: [{ADMIN}]\n" + "".join(
            f"  {line}\n" for line in api.splitlines()
        )
        pool = make_pool(extra=api + extra, **kwargs)
        launcher = pool.launcher(publish=True)
        running: serve.Running | Serving
        if here:
            listener = bind("127.0.0.1", 0)
            running = Serving(pool.config, pool.store, listener, launcher.wake)
            launcher.after_pass.append(running.scheduler.launcher_passed)
            url = url_of(listener)
        else:
            running = serve.start(pool.config, launcher)
            assert running.url is not None
            url = running.url
        stop = threading.Event()
        thread = threading.Thread(target=launcher.run, args=(stop,), name="launcher", daemon=True)
        thread.start()
        served = Served(pool, launcher, running, url)
        started.append((stop, thread, served))
        return served

    yield start
    for stop, thread, served in started:
        for client in served._clients:
            client.close()
        stop.set()
        thread.join(timeout=90)
        served.running.stop()
