"""A real pool, a real `freshpool jenkins serve` process, and the fake Jenkins it works
against (fake_jenkins.py says what is emulated and what is not).

The fake Jenkins listens on the pool's bridge address, on the one host port the
provider lets nodes reach (`network.host-ports`), as a Jenkins controller would be
reached by a node through the egress allowlist. The integration's default agent
command runs unchanged; its `agent.setup` puts the stand-in agent where agent.jar
would be (an image would carry the real one and a JDK) and a `java` that runs it.
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
from tests.integrations.jenkins.fake_jenkins import FakeJenkins
from tests.integrations.serving import Running, launch, prepare, run_cli

USER = "freshpool"
TOKEN = "11" + "ab" * 16
AGENT_SCRIPT = Path(__file__).with_name("agent") / "agent.py"
REMOTE_FS = "/var/lib/jenkins-agent"


def agent_setup() -> str:
    """`agent.setup`: the stand-in agent as agent.jar, and a `java` that runs it."""
    java = (
        '#!/bin/sh\n[ "$1" = -jar ] || { echo "java: only -jar here" >&2; exit 2; }\n'
        'jar=$2; shift 2; exec python3 "$jar" "$@"\n'
    )
    return (
        f"mkdir -p {REMOTE_FS} && cat > {REMOTE_FS}/agent.jar <<'FRESHPOOL_EOF'\n"
        f"{AGENT_SCRIPT.read_text()}FRESHPOOL_EOF\n"
        f"cat > /usr/local/bin/java <<'FRESHPOOL_EOF'\n{java}FRESHPOOL_EOF\n"
        "chmod +x /usr/local/bin/java"
    )


@dataclass(kw_only=True)
class Integration(Running):
    jenkins: FakeJenkins


def settings(fake: FakeJenkins, served: Served, token: str, status_port: int,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    base: dict[str, Any] = {
        "freshpool": {"url": served.url, "token": token, "request-timeout": 120},
        "jenkins": {"url": fake.url, "user": USER, "token-env": "TEST_JENKINS_TOKEN"},
        "labels": [{"label": "linux", "node-label": "debian", "max": 4}],
        "agent": {"setup": agent_setup()},
        "status": {"listen": "127.0.0.1", "port": status_port},
        "queue-interval": 1,
        "agent-timeout": 60,
    }  # fmt: skip
    base.update(overrides)
    return base


def env() -> dict[str, str]:
    return {**os.environ, "TEST_JENKINS_TOKEN": TOKEN}


def freshpool_jenkins(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli("jenkins", env(), *args, timeout=timeout)


@pytest.fixture
def integration(serve_pool: Callable[..., Served], tmp_path: Path  # noqa: F811
                ) -> Iterator[Callable[..., Integration]]:  # fmt: skip
    """`start(**overrides)`: the pool, the fake Jenkins and, unless `serve=False`, the
    integration process with the settings overridden."""
    made: list[Integration] = []

    def start(serve: bool = True, **overrides: Any) -> Integration:
        fake = FakeJenkins(USER, TOKEN)
        body = partial(settings, fake, **overrides)
        base = prepare(serve_pool, tmp_path, "jenkins", fake.serve, body)
        made.append(Integration(jenkins=fake, **vars(base)))
        if serve:
            launch(made[-1], "jenkins", env(), tmp_path)
        return made[-1]

    yield start
    for it in made:
        it.stop()
