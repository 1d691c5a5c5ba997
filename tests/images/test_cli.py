"""`freshpool image ...` as a person runs it: real processes, real builds, real validation nodes.

The images here are children of the session's prebuilt image, so no debootstrap runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import Pool

IMAGES = """  - name: debian-bookworm
  - name: tools
    parent: debian-bookworm
    steps:
      - name: marker
        run: echo "tools step ran" | tee /etc/fp-tools
    validate: ["grep -q 'tools step ran' /etc/fp-tools"]
  - name: broken
    parent: debian-bookworm
    steps: ["echo nope; exit 4"]
"""


def builds(pool: Pool, image: str) -> dict[str, dict[str, Any]]:
    result = pool.cli("image", "list", image, "--json", check=True)
    return {b["id"]: b for b in json.loads(result.stdout)}


def test_build_list_log_pause_rollback_delete(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=0, images=IMAGES)

    built = pool.cli("image", "build", "tools", "--wait")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "image tools: build tools-0001 ready" in built.stdout
    # The step's output streams while it runs.
    assert "tools step ran" in built.stderr
    listed = builds(pool, "tools")["tools-0001"]
    assert listed["state"] == "ready" and listed["serving"]
    assert listed["uploads"] == ["local:ready"]
    assert listed["parent_build"] == "debian-bookworm-test"
    log = pool.cli("image", "log", "tools-0001", check=True).stdout
    assert "==> step 1/1 (marker)" in log and "tools step ran" in log
    assert "validated in" in log

    paused = pool.cli("image", "pause", "tools", "--reason", "testing")
    assert paused.returncode == 0
    refused = pool.cli("image", "build", "tools")
    assert refused.returncode == 1
    assert "image tools is paused (testing)" in refused.stderr
    assert pool.cli("image", "unpause", "tools").returncode == 0

    again = pool.cli("image", "build", "tools", "--wait", "--fresh")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "build tools-0002 ready" in again.stdout
    assert builds(pool, "tools")["tools-0002"]["serving"]

    rolled = pool.cli("image", "rollback", "tools")
    assert rolled.returncode == 0, rolled.stderr
    assert "tools-0002 retired; new nodes launch from tools-0001" in rolled.stdout
    now = builds(pool, "tools")
    assert now["tools-0001"]["serving"] and now["tools-0002"]["state"] == "retired"
    nothing_older = pool.cli("image", "rollback", "tools")
    assert nothing_older.returncode == 1
    assert "no earlier build" in nothing_older.stderr

    deleted = pool.cli("image", "delete", "tools-0002")
    assert deleted.returncode == 0, deleted.stderr
    assert "build tools-0002 deleted" in deleted.stdout
    assert builds(pool, "tools")["tools-0002"]["state"] == "deleted"
    assert not Path(now["tools-0002"]["path"]).exists()
    assert pool.cli("image", "delete", "no-such-build").returncode == 2


def test_a_failed_build_says_which_step_and_why(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=0, images=IMAGES)
    failed = pool.cli("image", "build", "broken", "--wait")
    assert failed.returncode == 1
    assert "build broken-0001 failed" in failed.stderr
    assert "step 1/1 exited with status 4" in failed.stderr
    assert "nope" in failed.stderr
    (row,) = builds(pool, "broken").values()
    assert row["state"] == "failed" and not row["serving"]
    listed = pool.cli("image", "list", check=True).stdout
    assert "broken-0001" in listed and "failed" in listed


def test_build_requests_go_to_a_running_serve(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=0, images=IMAGES)
    serve = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(pool.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            not (pool.config.state_dir / "launcher.lock").exists()
            or "pid" not in (pool.config.state_dir / "launcher.lock").read_text()
        ):
            assert time.monotonic() < deadline, "serve did not start"
            assert serve.poll() is None, serve.stderr.read() if serve.stderr else ""
            time.sleep(0.1)
        built = pool.cli("image", "build", "tools", "--wait")
        assert built.returncode == 0, built.stdout + built.stderr
        assert "build tools-0001 ready" in built.stdout
        assert "tools step ran" in built.stderr
        # --no-build: nothing else was built on its own.
        assert builds(pool, "broken") == {}
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    assert serve.returncode == 0
