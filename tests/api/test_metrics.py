"""/metrics (and its statsd mirror) after a known sequence on a real pool.

The observer runs beside the launcher, here in the test's process, so its counters
carry over from earlier tests: each test compares what the API serves with a reading
of this process's registry taken before its sequence.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from freshpool.drivers.base import NodeSpec
from tests.api.conftest import Served, wait_for

BROKEN = """
  - name: broken
    image: debian-bookworm
    min-ready: 0
    ready-command: "exit 3"
"""

Key = tuple[str, tuple[tuple[str, str], ...]]


def scrape(served: Served) -> dict[Key, float]:
    return parse(served.client().get("/metrics").text)


def baseline() -> dict[Key, float]:
    """The observer's metrics in this process now."""
    return parse(generate_latest(REGISTRY).decode())


def parse(text: str) -> dict[Key, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> Key:
    return (name, tuple(sorted(labels.items())))


class StatsdListener:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.lines.extend(data.decode().splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


def test_metrics_after_a_known_sequence(
    serve_pool: Callable[..., Served], statsd: StatsdListener
) -> None:
    names = {
        "fulfilled": ("freshpool_requests_total", {"outcome": "fulfilled"}),
        "failed": ("freshpool_requests_total", {"outcome": "failed"}),
        "wait": ("freshpool_request_wait_seconds_count", {"tenant": "team-a"}),
        "deadline": ("freshpool_failures_total", {"cause": "deadline"}),
        "test_failed": ("freshpool_failures_total", {"cause": "test"}),
        "launches": ("freshpool_launches_total", {"provider": "local", "label": "debian"}),
        "launch_s": (
            "freshpool_launch_duration_seconds_count",
            {"provider": "local", "label": "debian"},
        ),
        "test_s": (
            "freshpool_test_duration_seconds_count",
            {"provider": "local", "label": "debian"},
        ),
        "delete_s": ("freshpool_delete_duration_seconds_count", {"provider": "local"}),
    }
    before = baseline()
    served = serve_pool(
        min_ready=2,
        max_nodes=4,
        extra_label=BROKEN,
        extra=f"statsd:\n  host: 127.0.0.1\n  port: {statsd.port}\n  prefix: fp\n",
    )
    served.wait_ready(2)
    api = served.client("team-a")
    # 1. One node handed out and given back: deleted and replaced.
    got = api.post("/requests", params={"wait": 60}, json={"labels": ["debian"]}).json()
    assert got["state"] == "fulfilled"
    (node,) = got["nodes"]
    assert api.post(f"/nodes/{node['id']}/release").status_code == 200
    # 2. A broken label: its node fails its test and the request fails at its deadline.
    failed = api.post(
        "/requests", params={"wait": 60}, json={"labels": ["broken"], "timeout": 1.5}
    ).json()
    assert failed["state"] == "failed"
    store = served.pool.store

    def settled() -> bool:
        ids = {n.id for n in store.nodes()}
        ready = store.nodes(["ready"], label="debian")
        return node["id"] not in ids and len(ready) == 2 and len(ids) == 2

    wait_for(settled, 90, "the pool back to 2 ready debian nodes")
    history = store.events_after(0)
    label_of = {e.node_id: e.label for e in history if e.label}
    label_of[node["id"]] = "debian"
    launched = [
        e for e in history if label_of.get(e.node_id) == "debian" and e.to_state == "building"
    ]
    test_failures = [e for e in history if (e.from_state, e.to_state) == ("testing", "failed")]
    removed = [e for e in history if e.from_state == "deleting" and e.to_state is None]
    assert len(launched) == 3 and test_failures and removed
    want = {
        "fulfilled": 1,
        "failed": 1,
        "wait": 1,
        "deadline": 1,
        "test_failed": len(test_failures),
        "launches": 3,
        "launch_s": 3,
        "test_s": 3,
        "delete_s": len(removed),
    }

    moved: dict[str, float] = {}

    def caught_up() -> dict[Key, float] | None:
        now = scrape(served)
        moved.update(
            {
                k: now.get(key(n, **labels), 0) - before.get(key(n, **labels), 0)
                for k, (n, labels) in names.items()
            }
        )
        return now if moved == want else None

    try:
        metrics = wait_for(caught_up, 30, "the metrics to catch up")
    except AssertionError:
        raise AssertionError(f"metrics moved by {moved}, expected {want}") from None
    nodes = {
        state: metrics[key("freshpool_nodes", state=state, label="debian", provider="local")]
        for state in ("ready", "in-use", "building", "deleting")
    }
    assert nodes == {"ready": 2, "in-use": 0, "building": 0, "deleting": 0}
    assert metrics[key("freshpool_nodes", state="ready", label="broken", provider="local")] == 0
    assert metrics[key("freshpool_ready")] == 1
    # The same events went to statsd.
    wait_for(lambda: any(x.startswith("fp.nodes.local.debian.ready:2|g") for x in statsd.lines), 30)
    assert "fp.requests.fulfilled:1|c" in statsd.lines
    assert any(x.startswith("fp.request_wait.team-a:") and x.endswith("|ms") for x in statsd.lines)
    assert sum(1 for x in statsd.lines if x.startswith("fp.launch.local.debian:")) == 3


def test_leaked_instances_are_counted(serve_pool: Callable[..., Served], tmp_path: Path) -> None:
    # Sweeps far enough apart that the instance below is complete before one sees it twice.
    before = baseline().get(key("freshpool_leaked_instances_total"), 0)
    served = serve_pool(min_ready=0, extra="cleanup-interval: 2\n")
    first_pass = threading.Event()
    served.launcher.after_pass.append(first_pass.set)
    # Once the launcher has started (recovery deletes strays without counting them as
    # leaks found while running), an instance with this cluster's tags and no row appears.
    wait_for(first_pass.is_set, 60, "the first pass")
    driver = served.launcher.drivers["local"]
    build = served.pool.store.serving_build("debian-bookworm")
    assert build is not None
    spec = NodeSpec(
        777_777,
        served.pool.store.cluster_id,
        "debian",
        "leaked",
        build.id,
        (Path(build.path) / "rootfs",),
    )
    driver.create(spec).wait(timeout=60)
    wait_for(
        lambda: scrape(served).get(key("freshpool_leaked_instances_total"), 0) == before + 1,
        60,
        "the leak to be counted",
    )
    wait_for(lambda: not driver.list_instances(), 60, "the leak to be deleted")
