"""`min-ready: auto` in the launcher, on the sim cloud: a burst of requests raises the
warm pool at once, quiet lowers it (ready nodes past the target deleted), and every
change of target is in the store's history."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import REGISTRY

from freshpool import launcher as launching
from freshpool.config import parse
from freshpool.core.states import BuildState
from freshpool.drivers.base import load_driver
from freshpool.launcher import Launcher
from freshpool.store import NewRequest, Store, queue_only
from tests.support import run_until

CONFIG = """
state-dir: {state}
interval: 0.05
providers:
  - name: sim
    driver: sim
    max-nodes: 10
    boot-timeout: 30
    sim: {{latency: 0.05, persist: false}}
labels:
  - name: debian
    image: img
    min-ready: {{auto: {{min: 1, max: 6, target-wait: 0}}}}
  - name: fixed
    image: img
    min-ready: 1
images:
  - name: img
"""


def auto_launcher(tmp_path: Path) -> Launcher:
    text = CONFIG.format(state=tmp_path / "state")
    (tmp_path / "auto.yaml").write_text(text)
    config = parse(text, "auto.yaml")
    store = Store.open(config.state_dir)
    if store.serving_build("img") is None:
        build = store.new_build("img-1", "img", str(tmp_path / "no-layers"))
        store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    return launching.build(config, store, drivers, images=False, publish=False)


def labels_why(tmp_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "freshpool", "--config", str(tmp_path / "auto.yaml"), "labels",
         "--why"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def ready(launcher: Launcher, label: str = "debian") -> int:
    return len([n for n in launcher.store.nodes(["ready"]) if n.label == label])


def test_a_burst_raises_the_warm_pool_and_quiet_lowers_it(tmp_path: Path) -> None:
    launcher = auto_launcher(tmp_path)
    later = [0.0]
    launcher.demand.clock = lambda: time.time() + later[0]
    store = launcher.store
    # No history: the target is min, and the fixed label keeps its own.
    run_until(launcher, lambda: ready(launcher) >= 1 and ready(launcher, "fixed") >= 1)
    launcher.pass_once()
    assert ready(launcher) == 1 and launcher.shared.ready_targets == {"debian": 1}

    # A burst, already served elsewhere (cancelled): only the target can launch for it.
    made = store.hand_out([NewRequest(("debian",))] * 100, queue_only, []).created
    for request in made:
        store.cancel_request(request.id, "served")
    run_until(launcher, lambda: ready(launcher) >= 6)
    launcher.pass_once()
    assert ready(launcher) == 6
    assert ready(launcher, "fixed") == 1
    raised = store.target_history("debian")[0]
    assert (raised.previous, raised.target) == (1, 6)
    assert "reactive" in raised.why and "capped at max 6" in raised.why

    assert REGISTRY.get_sample_value("freshpool_ready_target", {"label": "debian"}) == 6

    # `labels --why` says so.
    shown = labels_why(tmp_path)
    assert re.search(r"debian\s+auto 1-6, 95% within 0 s\s+6\s+6\s", shown), shown
    assert re.search(r"fixed\s+1\s+1\s+1\s", shown), shown
    assert "debian: target 6 (auto 1-6" in shown
    assert "launch time assumed 60 s" in shown  # none launched yet when it rose: the fallback
    assert "why: reactive (burst): covers 95% of requests within 0 s" in shown
    assert "1 -> 6" in shown and "fixed: fixed min-ready 1" in shown

    # Hours later with no requests: the target has decayed to min, the rest deleted.
    later[0] = 10 * 3600
    run_until(launcher, lambda: len(store.nodes(["ready", "deleting"])) == 2)
    assert ready(launcher) == 1
    lowered = store.target_history("debian")[0]
    assert (lowered.previous, lowered.target) == (6, 1)
    gone = [e for n in range(1, 20) for e in store.events(n) if e.to_state == "deleting"]
    assert len(gone) == 5 and all("warm pool target lowered to 1" in e.reason for e in gone)
    assert set(store.latest_targets()) == {"debian"}


def test_the_target_survives_a_restart(tmp_path: Path) -> None:
    first = auto_launcher(tmp_path)
    made = first.store.hand_out([NewRequest(("debian",))] * 100, queue_only, []).created
    for request in made:
        first.store.cancel_request(request.id, "served")
    run_until(first, lambda: ready(first) >= 6)
    first.stop(5)
    second = auto_launcher(tmp_path)
    second.pass_once()
    # Carried over and decaying from there, not back to min.
    assert second.shared.ready_targets["debian"] == 6
