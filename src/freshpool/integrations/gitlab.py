"""GitLab Runner's custom executor on freshpool nodes: `freshpool gitlab config|prepare|
run|cleanup`, the four executables of gitlab-runner's `[runners.custom]` section.

gitlab-runner runs each as a process of its own, so the job's lease (its nodes and its
SSH key) is kept between them in a file under `state-dir`, named by the job's id.
`prepare` takes a node for the job, each `run <script> <stage>` runs one stage's script
on it over SSH with its output streamed, `cleanup` (always called) releases it. An
infrastructure fault exits with $SYSTEM_FAILURE_EXIT_CODE, so GitLab retries the job;
a failing script with $BUILD_FAILURE_EXIT_CODE.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import Field

from freshpool.config.base import Model, Seconds
from freshpool.config.loader import load_model
from freshpool.integrations.agent import Lease, NoNode
from freshpool.integrations.settings import FreshpoolSettings

log = logging.getLogger("freshpool.integrations.gitlab")

INTEGRATION = "gitlab"
# Where a stage's script and its process group id live on the node.
NODE_DIR = "/tmp/freshpool-gitlab"
# ssh's own failure (the node unreachable, its sshd gone), not the script's.
SSH_FAILED = 255


class Settings(Model):
    freshpool: FreshpoolSettings = FreshpoolSettings()
    # Node labels for a job that does not name its own in `label-variable`.
    labels: list[str] = Field(default=["debian"], min_length=1)
    # A CI/CD variable a job may set to choose its node set ("debian" or "debian,arm").
    label_variable: str = Field(default="FRESHPOOL_LABELS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    state_dir: Path = Path("/var/lib/freshpool/gitlab")
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    # After SIGTERM is passed to the stage's processes on the node, how long they get
    # before SIGKILL (gitlab-runner's own force_kill_timeout bounds this executor).
    kill_grace: Seconds = 10.0


def load(path: Path) -> Settings:
    return load_model(path, Settings)[0]


class Job:
    """The job gitlab-runner is running, from the environment it gives each stage."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.id = env.get("CUSTOM_ENV_CI_JOB_ID", "")
        if not re.fullmatch(r"[0-9]+", self.id):
            raise ValueError("CUSTOM_ENV_CI_JOB_ID is missing or not a number: not run by "
                             "gitlab-runner's custom executor?")  # fmt: skip

    @staticmethod
    def exit_code(env: Mapping[str, str], which: str) -> int:
        """$BUILD_FAILURE_EXIT_CODE or $SYSTEM_FAILURE_EXIT_CODE, as gitlab-runner set it."""
        value = env.get(f"{which}_FAILURE_EXIT_CODE", "1")
        return int(value) if value.isdigit() else 1

    def code(self, which: str) -> int:
        return self.exit_code(self.env, which)

    def labels(self, settings: Settings) -> list[str]:
        chosen = self.env.get(f"CUSTOM_ENV_{settings.label_variable}", "")
        return [x for x in re.split(r"[,\s]+", chosen) if x] or list(settings.labels)

    def state_file(self, settings: Settings) -> Path:
        return settings.state_dir / f"job-{self.id}.json"


def config_output(settings: Settings) -> dict[str, Any]:
    """What `config` prints: where builds and caches go on the node, and who we are."""
    return {
        "builds_dir": settings.builds_dir,
        "cache_dir": settings.cache_dir,
        "builds_dir_is_shared": False,
        "driver": {"name": "freshpool", "version": version("freshpool")},
    }


def prepare(settings: Settings, job: Job) -> int:
    labels = job.labels(settings)
    client = settings.freshpool.client()
    try:
        lease = Lease.acquire(
            client, INTEGRATION, labels, settings.freshpool.request_timeout,
            requestor=f"gitlab job {job.id}",
        )  # fmt: skip
    except NoNode as exc:
        print(f"freshpool: {exc}", file=sys.stderr)
        return job.code("SYSTEM")
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    job.state_file(settings).write_text(json.dumps(lease.save()))
    done = lease.run(f"mkdir -p {shlex.quote(settings.builds_dir)} "
                     f"{shlex.quote(settings.cache_dir)} {NODE_DIR}")  # fmt: skip
    if done.returncode != 0:
        print(f"freshpool: node {lease.node_ids[0]} cannot be prepared: {done.stderr.strip()}",
              file=sys.stderr)  # fmt: skip
        return job.code("SYSTEM")
    lease.job_started(f"gitlab job {job.id}")
    node = lease.nodes[0].node
    print(f"Running on freshpool node {node.id} ({node.hostname}, {node.label})")
    return 0


def _lease(settings: Settings, job: Job) -> Lease | None:
    try:
        saved = json.loads(job.state_file(settings).read_text())
    except FileNotFoundError:
        return None
    return Lease.restore(settings.freshpool.client(), INTEGRATION, saved)


def _stage_command(stage: str) -> str:
    """Store the script (from stdin) and run it in a process group of its own, whose id is
    saved, so a cancel can signal everything the stage started on the node."""
    script = f"{NODE_DIR}/{stage}.sh"
    inner = f'echo $$ > {NODE_DIR}/pgid; exec bash "$0"'
    return (f"mkdir -p {NODE_DIR} && cat > {script} && exec setsid -w sh -c "
            f"{shlex.quote(inner)} {script} </dev/null")  # fmt: skip


def _stop_command(grace: float) -> str:
    """SIGTERM to the stage's process group on the node; SIGKILL if it outlives `grace`."""
    polls = max(1, int(grace * 5))
    return (f"g=$(cat {NODE_DIR}/pgid) || exit 0; kill -TERM -$g 2>/dev/null || exit 0; "
            f"for i in $(seq {polls}); do kill -0 -$g 2>/dev/null || exit 0; sleep 0.2; done; "
            "kill -KILL -$g 2>/dev/null; true")  # fmt: skip


def run(settings: Settings, job: Job, script: Path, stage: str) -> int:
    lease = _lease(settings, job)
    if lease is None:
        print(f"freshpool: job {job.id} has no node (did prepare fail?)", file=sys.stderr)
        return job.code("SYSTEM")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", stage):
        print(f"freshpool: {stage!r} is not a stage name", file=sys.stderr)
        return job.code("SYSTEM")
    proc = subprocess.Popen(lease.ssh(_stage_command(stage)), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(script.read_bytes())
    proc.stdin.close()

    cancelled: list[int] = []

    def cancel(signum: int, _frame: FrameType | None) -> None:
        cancelled.append(signum)
        # gitlab-runner cancels or times the job out: pass it on to the stage's
        # processes on the node, then kill what is left after the grace time.
        print(f"freshpool: {signal.Signals(signum).name}: stopping the stage on the node",
              file=sys.stderr, flush=True)  # fmt: skip
        lease.run(_stop_command(settings.kill_grace), timeout=settings.kill_grace + 30)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    returned = proc.wait()
    if cancelled:
        # The stage did not finish; whatever the script's traps made of it.
        return job.code("BUILD")
    if returned == 0:
        return 0
    if returned == SSH_FAILED:
        print(f"freshpool: lost node {lease.node_ids[0]} during {stage}", file=sys.stderr)
        return job.code("SYSTEM")
    return job.code("BUILD")


def cleanup(settings: Settings, job: Job) -> int:
    lease = _lease(settings, job)
    if lease is not None:
        lease.release()
        job.state_file(settings).unlink(missing_ok=True)
    return 0
