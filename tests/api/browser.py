"""Debian's chromium driven by Playwright (never downloaded), for the dashboard tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("FRESHPOOL_TEST_ARTIFACTS", "/tmp/freshpool-artifacts"))
needs_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM), reason="apt-get install chromium (see .ci/run)"
)


@contextmanager
def page_at(url: str, problems: list[str]) -> Iterator[Any]:
    """A page open at `url`; its console errors, page errors and failed requests are
    added to `problems`, which the test checks is empty."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
            page.goto(url)
            yield page
        finally:
            browser.close()
