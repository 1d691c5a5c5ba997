"""`freshpool gitlab config|prepare|run|cleanup`: GitLab Runner's custom executor."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freshpool.cli.app import app, group

if TYPE_CHECKING:
    from freshpool.integrations.gitlab import Job, Settings

gitlab_app = group("GitLab Runner's custom executor: each job on a fresh freshpool node.")
app.add_typer(gitlab_app, name="gitlab")

GitlabConfigOpt = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The executor's settings file (YAML; see the README's GitLab section).",
        envvar="FRESHPOOL_GITLAB_CONFIG",
        show_default=False,
    ),
]


def _stage(config_path: Path, step: Callable[[Settings, Job], int]) -> None:
    """Run one of the executor's stages. Whatever goes wrong in freshpool's part exits
    with $SYSTEM_FAILURE_EXIT_CODE, so GitLab reports a system failure, not the job's."""
    from freshpool.core.errors import FreshpoolError
    from freshpool.integrations import gitlab

    system = gitlab.Job.exit_code(os.environ, "SYSTEM")
    try:
        settings = gitlab.load(config_path)
        code = step(settings, gitlab.Job(os.environ))
    except FreshpoolError as exc:
        problems = getattr(exc, "problems", None) or [exc]
        for problem in problems:
            print(f"freshpool: {problem}", file=sys.stderr)
        code = system
    except (ValueError, OSError) as exc:
        print(f"freshpool: {exc}", file=sys.stderr)
        code = system
    raise typer.Exit(code)


@gitlab_app.command("config")
def gitlab_config(config_path: GitlabConfigOpt) -> None:
    """config_exec: print where builds and caches go on the node."""
    from freshpool.integrations import gitlab

    def step(settings: Settings, _job: Job) -> int:
        print(json.dumps(gitlab.config_output(settings)))
        return 0

    _stage(config_path, step)


@gitlab_app.command("prepare")
def gitlab_prepare(config_path: GitlabConfigOpt) -> None:
    """prepare_exec: take a fresh node for the job (waits up to request-timeout)."""
    from freshpool.integrations import gitlab

    _stage(config_path, gitlab.prepare)


@gitlab_app.command("run")
def gitlab_run(
    script: Annotated[Path, typer.Argument(help="The stage's script gitlab-runner wrote.")],
    stage: Annotated[str, typer.Argument(help="The stage's name (prepare_script, ...).")],
    config_path: GitlabConfigOpt,
) -> None:
    """run_exec: run one stage's script on the job's node, its output streamed."""
    from freshpool.integrations import gitlab

    _stage(config_path, lambda settings, job: gitlab.run(settings, job, script, stage))


@gitlab_app.command("cleanup")
def gitlab_cleanup(config_path: GitlabConfigOpt) -> None:
    """cleanup_exec: give the job's node back; it is destroyed, never reused."""
    from freshpool.integrations import gitlab

    _stage(config_path, gitlab.cleanup)
