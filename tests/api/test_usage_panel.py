"""The dashboard's usage panel in a real browser (Debian's chromium, Playwright), on a
store with two weeks of known history; it also takes the README's picture."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.api.server import bind, url_of
from freshpool.config import parse
from freshpool.core.states import NodeState
from freshpool.serve.apiprocess import Serving
from freshpool.store import Store
from tests.api.browser import ARTIFACTS, needs_chromium, page_at
from tests.support import fulfil

N = NodeState
TENANTS = {"web": 9, "mobile": 5, "data": 2}  # jobs per day


def one_job(store: Store, clock: list[float], tenant: str, rng: random.Random) -> None:
    """A node's whole life: launch, test, wait ready, one job for `tenant`, deletion."""
    row = store.new_node("debian", "cloud", "", "n")
    for expect, to, took in (
        (N.BUILDING, N.TESTING, 90),
        (N.TESTING, N.READY, 30),
    ):
        clock[0] += took
        store.transition(row.id, expect, to, "step")
    clock[0] += rng.uniform(300, 1800)  # idle in the warm pool
    request = store.new_request(["debian"], tenant=tenant)
    assert fulfil(store, request.id, ["cloud"])
    clock[0] += rng.uniform(1200, 5400)  # the job
    store.release_set(row.id, "done")
    store.transition(row.id, N.USED, N.DELETING, "delete")
    clock[0] += 40
    store.remove_node(row.id, "gone")


def fortnight(store: Store, now: float) -> None:
    rng = random.Random(7)
    clock = [0.0]
    store.clock = lambda: clock[0]
    today = now - now % 86400
    for back in range(13, -1, -1):
        for tenant, jobs in TENANTS.items():
            for _ in range(jobs + rng.randint(-1, 3)):
                # Jobs through the working day; each node's own times run forward.
                clock[0] = today - back * 86400 + rng.uniform(6, 16) * 3600
                if clock[0] + 8000 < now:
                    one_job(store, clock, tenant, rng)
    store.clock = time.time


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    config = parse(f"""
state-dir: {tmp_path}
providers:
  - {{name: cloud, driver: sim, cost-per-hour: 0.19}}
labels: [{{name: debian, image: i, min-ready: 0}}]
images: [{{name: i}}]
api: {{port: 0}}
""")
    store = Store.open(tmp_path)
    fortnight(store, time.time())
    listener = bind("127.0.0.1", 0)
    running = Serving(config, store, listener, lambda: None)
    try:
        yield url_of(listener)
    finally:
        running.stop()
        store.close()


@needs_chromium
def test_usage_panel_charts_each_tenant_per_day(served: str) -> None:
    import httpx

    report = httpx.get(f"{served}/usage", params={"days": 14}).json()
    expected = {r["group"]: r for r in report["rows"]}
    assert set(expected) == {"", *TENANTS}
    problems: list[str] = []
    with page_at(served + "/", problems) as page:
        page.wait_for_selector("#usage tr[data-tenant='web']")
        cells = page.locator("#usage tr[data-tenant='web'] td").all_inner_texts()
        web = expected["web"]
        assert cells[0] == "web" and cells[1] == f"{web['node_hours']:.0f}"
        assert cells[5] == f"{web['cost']:.2f}"
        # One bar for each day a tenant ran nodes, as /usage counted them.
        bars = page.locator("#chart-usage rect[data-tenant='web']").count()
        assert bars == sum(1 for d in report["days"] if d["tenant"] == "web")
        assert bars >= 13
        page.locator("#usage-panel").screenshot(path=str(ARTIFACTS / "usage-panel.png"))
    assert problems == []
    assert (ARTIFACTS / "usage-panel.png").stat().st_size > 10_000
