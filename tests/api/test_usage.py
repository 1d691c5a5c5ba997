"""GET /usage and /usage/tco over real HTTP, on a store with a known history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from freshpool.api import tokens
from freshpool.api.server import bind, url_of
from freshpool.config import parse
from freshpool.serve.apiprocess import Serving
from freshpool.store import Store
from tests.store.test_usage import lived


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    config = parse(f"""
state-dir: {tmp_path}
providers:
  - {{name: p, driver: sim, label-cost-per-hour: {{a: 0.5}}}}
  - {{name: q, driver: sim}}
labels: [{{name: a, image: i, min-ready: 0}}]
images: [{{name: i}}]
api: {{port: 0, admin-tenants: [ops]}}
""")
    store = Store.open(tmp_path)
    lived(store)
    listener = bind("127.0.0.1", 0)
    running = Serving(config, store, listener, lambda: None)
    try:
        yield url_of(listener), store
    finally:
        running.stop()
        store.close()


def test_usage_answers_from_history_and_a_tenant_sees_only_its_own(
    api: tuple[str, Store],
) -> None:
    url, store = api
    window = {"since": 0, "until": 10_000}
    got = httpx.get(f"{url}/usage", params={**window, "by": "tenant"}).json()
    rows = {r["group"]: r for r in got["rows"]}
    assert rows["team-x"]["hours"] == {"idle": 0.0, "in-use": 1.0, "overhead": 60 / 3600}
    assert rows["team-x"]["cost"] == pytest.approx(0.5 * (3600 + 60) / 3600)
    assert rows[""]["states"]["ready"] == (1800 + 8880) / 3600
    assert {d["tenant"] for d in got["days"]} == {"", "team-x"}
    secret = tokens.create(store, "team-x")[1]
    mine = httpx.get(
        f"{url}/usage", params=window, headers={"Authorization": f"Bearer {secret}"}
    ).json()
    assert [r["group"] for r in mine["rows"]] == ["team-x"]
    by_provider = httpx.get(f"{url}/usage", params={**window, "by": "provider"}).json()
    assert [r["group"] for r in by_provider["rows"]] == ["p"]


def test_tco_and_bad_input(api: tuple[str, Store]) -> None:
    url, _ = api
    got = httpx.get(
        f"{url}/usage/tco",
        params={
            "until": 10_000,
            "days": 10_000 / 86400,
            "host-monthly-cost": 1,
            "host_monthly_cost": 900,
            "host_capacity": 4,
        },
    )
    assert got.status_code == 422  # a misspelt parameter is refused, not ignored
    got = httpx.get(
        f"{url}/usage/tco",
        params={
            "until": 10_000,
            "days": 10_000 / 86400,
            "host_monthly_cost": 900,
            "host_capacity": 4,
        },
    ).json()
    costs = {o["name"]: o["cost"] for o in got["options"]}
    assert got["peak_nodes"] == 2 and got["hosts"] == 1
    assert costs["q"] is None  # no price on q: unknown, never zero
    assert costs["p"] == pytest.approx(got["node_hours"] * 0.5)
    assert httpx.get(f"{url}/usage", params={"by": "colour"}).status_code == 422
