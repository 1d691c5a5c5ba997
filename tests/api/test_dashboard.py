"""The dashboard in a real browser: Debian's chromium driven by Playwright (never downloaded)."""

from __future__ import annotations

from collections.abc import Callable

from tests.api.browser import ARTIFACTS, needs_chromium, page_at
from tests.api.conftest import Served


@needs_chromium
def test_dashboard_shows_the_pool_and_follows_it_live(serve_pool: Callable[..., Served]) -> None:
    served = serve_pool(min_ready=2, max_nodes=3)
    served.wait_ready(2)
    api = served.client("team-a")
    # Some history for the charts: one hand-out, given back.
    first = api.post("/requests", params={"wait": 60}, json={"labels": ["debian"]}).json()
    api.post(f"/nodes/{first['nodes'][0]['id']}/release")
    served.wait_ready(2)
    problems: list[str] = []
    with page_at(served.url + "/", problems) as page:
        page.wait_for_selector("#live.on")
        page.wait_for_selector("tr[data-node][data-state='ready']")
        card = page.locator(".card[data-label='debian']")
        assert card.locator("[data-count='ready']").inner_text() == "2"

        got = api.post("/requests", params={"wait": 60}, json={"labels": ["debian"]}).json()
        assert got["state"] == "fulfilled"
        node_id = got["nodes"][0]["id"]
        # Live: the hand-out shows without a reload, within 2 s.
        page.wait_for_selector(
            f"tr[data-node='{node_id}'][data-state='in-use']", state="attached", timeout=2000
        )
        # A set too big to serve now waits in the queue.
        waiting = api.post("/requests", json={"labels": ["debian"] * 3, "timeout": 120})
        page.wait_for_selector(
            f"#queue tr[data-request='{waiting.json()['id']}']", state="attached"
        )
        page.wait_for_selector("#chart-pool polyline")
        assert page.locator("#builds tbody tr").first.inner_text().startswith("debian-bookworm")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert problems == []
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


@needs_chromium
def test_dashboard_shows_why_an_auto_label_has_its_target(
    serve_pool: Callable[..., Served],
) -> None:
    served = serve_pool(min_ready="{auto: {min: 1, max: 3, target-wait: 0.5}}", max_nodes=3)
    served.wait_ready(1)
    problems: list[str] = []
    with page_at(served.url + "/", problems) as page:
        page.wait_for_selector("#live.on")
        card = page.locator(".card[data-label='debian']")
        card.locator("[data-why]").wait_for()
        assert card.locator("[data-count='target']").inner_text() == "1"
        why = card.locator("[data-why]").inner_text()
        assert "auto 1-3, 95% within 0.5 s" in why, why
        # No history yet: the launcher keeps min, and says so.
        assert "short history: min" in why and "wants 0" in why, why
        page.screenshot(path=str(ARTIFACTS / "dashboard-auto.png"), full_page=True)
    assert problems == []
