"""A real pool, a real `freshpool github serve` process, and the fake GitHub it works
against (see fake_github.py for what is emulated and what is not).

The fake GitHub listens on the pool's bridge address, on the one host port the
provider lets nodes reach (`network.host-ports`), as github.com would be reached by a
node through the egress allowlist. The stand-in runner is put on each node by the
integration's own `runner.setup`, as an operator would fetch actions/runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import Served, serve_pool, wait_for  # noqa: F401 - the fixture
from tests.integrations.buildbot.harness import free_port
from tests.integrations.github.fake_github import FakeGithub
from tests.support import stop_group

GITHUB_TOKEN = "ghp_test_" + "x" * 30
WEBHOOK_SECRET = "it is a secret"
LABELS = ["self-hosted", "linux", "freshpool-debian"]
RUNNER_SCRIPT = Path(__file__).with_name("runner") / "run.sh"


def runner_setup() -> str:
    """`runner.setup`: install the stand-in runner where the default command looks."""
    return (
        "mkdir -p /opt/actions-runner && cat > /opt/actions-runner/run.sh <<'FRESHPOOL_EOF'\n"
        f"{RUNNER_SCRIPT.read_text()}FRESHPOOL_EOF\nchmod +x /opt/actions-runner/run.sh"
    )


@dataclass
class Integration:
    github: FakeGithub
    served: Served
    config: Path
    status_url: str
    process: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.status_url, timeout=10).json())

    def nodes_in_use(self) -> list[int]:
        return [n.id for n in self.served.pool.store.nodes(["in-use", "reserved"])]


def settings(fake: FakeGithub, served: Served, token: str, hook_port: int,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    base: dict[str, Any] = {
        "freshpool": {"url": served.url, "token": token, "request-timeout": 120},
        "github": {"repository": "octo-org/octo-repo", "api-url": fake.url,
                   "token-env": "TEST_GITHUB_TOKEN"},
        "webhook": {"listen": "127.0.0.1", "port": hook_port, "secret-env": "TEST_HOOK_SECRET"},
        "runners": [{"labels": LABELS, "node-label": "debian"}],
        "runner": {"setup": runner_setup()},
        "reconcile-interval": 2,
        "agent-timeout": 60,
        "idle-timeout": 600,
        "max-runners": 4,
    }  # fmt: skip
    base.update(overrides)
    return base


def env() -> dict[str, str]:
    return {**os.environ, "TEST_GITHUB_TOKEN": GITHUB_TOKEN, "TEST_HOOK_SECRET": WEBHOOK_SECRET}


def freshpool_github(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "freshpool", "github", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture
def integration(serve_pool: Callable[..., Served], tmp_path: Path  # noqa: F811
                ) -> Iterator[Callable[..., Integration]]:  # fmt: skip
    """`start(**overrides)`: the pool, the fake GitHub and, unless `serve=False`, the
    integration process with the settings overridden."""
    made: list[Integration] = []

    def start(serve: bool = True, **overrides: Any) -> Integration:
        github_port = free_port()
        served = serve_pool(min_ready=2, max_nodes=4, network=f"host-ports: [{github_port}]")
        served.client("github")
        gateway = str(IPv4Network(str(served.pool.config.providers[0].network.subnet))[1])
        served.wait_ready(2)  # the bridge, and its address, exist now
        fake = FakeGithub(GITHUB_TOKEN, WEBHOOK_SECRET)
        fake.serve(gateway, github_port)
        hook_port = free_port()
        config = tmp_path / "github.yaml"
        body = settings(fake, served, served.secrets["github"], hook_port, **overrides)
        config.write_text(json.dumps(body, indent=2))  # JSON is YAML
        made.append(Integration(fake, served, config, f"http://127.0.0.1:{hook_port}/status"))
        fake.hook_url = f"http://127.0.0.1:{hook_port}/integrations/github/webhook"
        if serve:
            launch(made[-1], tmp_path)
        return made[-1]

    yield start
    for it in made:
        stop(it)


def launch(it: Integration, tmp_path: Path) -> None:
    log = open(tmp_path / "github-serve.log", "ab")  # noqa: SIM115 - the process's life
    it.process = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "github", "serve", "-c", str(it.config),
         "--log-dir", str(tmp_path / "runners")],
        env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()

    def up() -> bool:
        assert it.process is not None and it.process.poll() is None, (
            tmp_path / "github-serve.log"
        ).read_text()
        try:
            return httpx.get(it.status_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "freshpool github serve")


def stop(it: Integration) -> None:
    if it.process is not None:
        stop_group(it.process)
