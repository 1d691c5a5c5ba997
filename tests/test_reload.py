"""`freshpool serve` takes a new config without a restart (SIGHUP, `config reload`):
a real serve process, real local nodes, its API; labels added and removed live, a
bad file refused while the running config stays."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from freshpool.serve.reload import RESULT_FILE
from tests.support import Pool

SECOND = """  - name: second
    image: debian-bookworm
    min-ready: 1
"""


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def serving(make_pool: Callable[..., Pool]) -> Iterator[tuple[Pool, subprocess.Popen[str]]]:
    pool = make_pool(min_ready=2, max_nodes=6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(pool.config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(pool.store.nodes(["ready"])) >= 2, 120, "2 ready nodes")
        yield pool, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)


def ready(pool: Pool, label: str) -> set[int]:
    return {n.id for n in pool.store.nodes(["ready"]) if n.label == label}


def test_labels_come_and_go_live_and_a_bad_file_changes_nothing(
    serving: tuple[Pool, subprocess.Popen[str]],
) -> None:
    pool, proc = serving
    original = pool.config_path.read_text()
    first = ready(pool, "debian")
    url = (pool.config.state_dir / "api.url").read_text().strip()

    # A label added: its nodes come; the running ones are kept, not made again.
    pool.config_path.write_text(original.replace("images:\n", SECOND + "images:\n", 1))
    took = pool.cli("config", "reload")
    assert took.returncode == 0 and "taken" in took.stdout, took.stdout + took.stderr
    wait_for(lambda: len(ready(pool, "second")) == 1, 120, "a node of the new label")
    assert first <= ready(pool, "debian")
    # The API listened throughout on the same address.
    assert (pool.config.state_dir / "api.url").read_text().strip() == url
    assert httpx.get(f"{url}/status", timeout=10).status_code == 200

    # A file with an error: `config reload` refuses it before serve sees it; a
    # SIGHUP with it is refused by serve, which goes on as it was.
    good = pool.config_path.read_text()
    pool.config_path.write_text(good.replace("min-ready: 1", "min-ready: lots", 1))
    refused = pool.cli("config", "reload")
    assert refused.returncode == 2 and "min-ready" in refused.stderr, refused.stderr
    proc.send_signal(signal.SIGHUP)
    result = pool.config.state_dir / RESULT_FILE
    wait_for(lambda: "min-ready" in result.read_text(), 30, "serve's refusal")
    assert not json.loads(result.read_text())["ok"]
    assert proc.poll() is None and len(ready(pool, "second")) == 1

    # The label removed: its ready node is deleted, the others stay.
    kept = ready(pool, "debian")
    second = ready(pool, "second")
    pool.config_path.write_text(original)
    assert pool.cli("config", "reload").returncode == 0
    wait_for(lambda: not (second & {n.id for n in pool.store.nodes()}), 60, "the drain")
    assert kept <= ready(pool, "debian")
    history = [e.reason for e in pool.store.events(next(iter(second)))]
    assert any("no longer in the config" in r for r in history), history
