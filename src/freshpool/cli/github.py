"""`freshpool github ...`: GitHub Actions jobs on freshpool nodes (JIT runners)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freshpool.cli.app import app, err, friendly, group, out

github_app = group("GitHub Actions: just-in-time runners on freshpool nodes.")
app.add_typer(github_app, name="github")

GithubConfigOpt = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The integration's settings file (YAML; see the README's GitHub section).",
        envvar="FRESHPOOL_GITHUB_CONFIG",
        show_default=False,
    ),
]
LogDirOpt = Annotated[
    Path,
    typer.Option(help="Where each runner's output is written, one file per runner."),
]


@github_app.command("serve")
@friendly
def github_serve(
    config_path: GithubConfigOpt,
    log_dir: LogDirOpt = Path("/var/log/freshpool/github"),
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Receive workflow_job webhooks, reconcile with the REST API, and run each queued
    job's runner on a fresh node (the node is destroyed after its one job)."""
    from freshpool import logs
    from freshpool.integrations.github import config, serve, webhook

    settings = config.load(config_path)
    logs.setup(log_level)
    hook = settings.webhook
    err.print(
        f"freshpool github: {settings.github.scope_path} at {settings.github.api_url}; "
        f"webhook at http://{hook.listen}:{hook.port}{webhook.PATH}, status at /status"
    )
    serve.serve(settings, log_dir)


@github_app.command("check")
@friendly
def github_check(config_path: GithubConfigOpt) -> None:
    """Check the settings file and that GitHub accepts the token (or App) for the
    runners of the configured repository or organization."""
    from freshpool.integrations.github import config, serve

    settings = config.load(config_path)
    api = serve.connect(settings)
    group_id = api.runner_group_id(settings.github.runner_group)
    runners = api.runners()
    prefix = settings.runner.name_prefix
    ours = sum(1 for r in runners if r.get("name", "").startswith(prefix))
    out.print(
        f"ok: {settings.github.scope_path} at {settings.github.api_url}; runner group "
        f"{settings.github.runner_group} (id {group_id}); {len(runners)} self-hosted runners, "
        f"{ours} named {prefix}*"
    )
