"""A real pool, a real `freshpool github serve` process, and the fake GitHub it works
against (see fake_github.py for what is emulated and what is not).

The fake GitHub listens on the pool's bridge address, on the one host port the
provider lets nodes reach (`network.host-ports`), as github.com would be reached by a
node through the egress allowlist. The stand-in runner is put on each node by the
integration's own `runner.setup`, as an operator would fetch actions/runner.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import Served, serve_pool  # noqa: F401 - the fixture
from tests.integrations.github.fake_github import FakeGithub
from tests.integrations.serving import Running, launch, prepare, run_cli

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


@dataclass(kw_only=True)
class Integration(Running):
    github: FakeGithub


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
    return run_cli("github", env(), *args, timeout=timeout)


@pytest.fixture
def integration(serve_pool: Callable[..., Served], tmp_path: Path  # noqa: F811
                ) -> Iterator[Callable[..., Integration]]:  # fmt: skip
    """`start(**overrides)`: the pool, the fake GitHub and, unless `serve=False`, the
    integration process with the settings overridden."""
    made: list[Integration] = []

    def start(serve: bool = True, **overrides: Any) -> Integration:
        fake = FakeGithub(GITHUB_TOKEN, WEBHOOK_SECRET)
        body = partial(settings, fake, **overrides)
        base = prepare(serve_pool, tmp_path, "github", fake.serve, body)
        made.append(Integration(github=fake, **vars(base)))
        fake.hook_url = base.status_url.replace("/status", "/integrations/github/webhook")
        if serve:
            launch(made[-1], "github", env(), tmp_path)
        return made[-1]

    yield start
    for it in made:
        it.stop()
