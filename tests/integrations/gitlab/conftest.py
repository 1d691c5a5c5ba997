"""gitlab-runner's side of the custom executor, and a real served pool for it.

Emulated: gitlab-runner itself (a Go program packaged neither for Debian nor PyPI).
`Runner` does what its custom executor does, as GitLab documents it: each of config,
prepare, run (once per stage, `<script> <stage>`) and cleanup is a process of its own;
job variables come as CUSTOM_ENV_*, with BUILD_FAILURE_EXIT_CODE and
SYSTEM_FAILURE_EXIT_CODE; a cancelled job's run process gets SIGTERM; cleanup always
runs. The pool, its nodes, SSH and the HTTP API are real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.api.conftest import Served, serve_pool  # noqa: F401 - the fixture

BUILD_FAILURE = 17
SYSTEM_FAILURE = 23
# The stages gitlab-runner runs through run_exec, in its order.
STAGES = ["prepare_script", "get_sources", "restore_cache", "download_artifacts",
          "step_script", "after_script", "archive_cache", "upload_artifacts_on_success",
          "cleanup_file_variables"]  # fmt: skip


def job_script(body: str) -> str:
    """A stage's script the way gitlab-runner's bash shell writes one."""
    return f"#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n{body}\nexit 0\n"


@dataclass
class Runner:
    config: Path
    served: Served
    work: Path
    job_ids: Iterator[int] = field(default_factory=lambda: iter(range(1000, 100000)))

    def env(self, job: int, variables: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOM_ENV_")}
        env.update(
            CUSTOM_ENV_CI_JOB_ID=str(job), CUSTOM_ENV_CI_PROJECT_PATH="group/project",
            BUILD_FAILURE_EXIT_CODE=str(BUILD_FAILURE),
            SYSTEM_FAILURE_EXIT_CODE=str(SYSTEM_FAILURE),
        )  # fmt: skip
        env.update({f"CUSTOM_ENV_{k}": v for k, v in (variables or {}).items()})
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "freshpool", "gitlab", *args, "--config", str(self.config)]

    def call(self, job: int, *args: str, variables: dict[str, str] | None = None,
             env: dict[str, str] | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            self.argv(*args), env=env or self.env(job, variables), capture_output=True,
            text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def script(self, job: int, stage: str, body: str) -> Path:
        path = self.work / f"job{job}-{stage}.sh"
        path.write_text(job_script(body))
        return path

    def run(self, job: int, stage: str, body: str) -> subprocess.CompletedProcess[str]:
        return self.call(job, "run", str(self.script(job, stage, body)), stage)

    def start_run(self, job: int, stage: str, body: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv("run", str(self.script(job, stage, body)), stage), env=self.env(job),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture
def runner(serve_pool: Callable[..., Served], tmp_path: Path) -> Runner:  # noqa: F811
    served = serve_pool(min_ready=2, max_nodes=4)
    token = served.client("gitlab") and served.secrets["gitlab"]
    config = tmp_path / "gitlab.yaml"
    config.write_text(
        f"freshpool:\n  url: {served.url}\n  token: {token}\n  request-timeout: 120\n"
        f"state-dir: {tmp_path / 'executor'}\nkill-grace: 1\n"
    )
    served.wait_ready(2)
    return Runner(config, served, tmp_path)


def gone(served: Served, node_id: int) -> bool:
    """The node is destroyed or being destroyed: never back to ready."""
    return all(n.state == "deleting" for n in served.pool.store.nodes() if n.id == node_id)
