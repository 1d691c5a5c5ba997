"""`freshpool jenkins ...`: Jenkins builds on freshpool nodes (one agent per node)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freshpool.cli.app import app, err, friendly, group, out

jenkins_app = group("Jenkins: one single-use inbound agent per freshpool node.")
app.add_typer(jenkins_app, name="jenkins")

JenkinsConfigOpt = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The integration's settings file (YAML; see the README's Jenkins section).",
        envvar="FRESHPOOL_JENKINS_CONFIG",
        show_default=False,
    ),
]


@jenkins_app.command("serve")
@friendly
def jenkins_serve(
    config_path: JenkinsConfigOpt,
    log_dir: Annotated[
        Path, typer.Option(help="Where each agent's output is written, one file per agent.")
    ] = Path("/var/log/freshpool/jenkins"),
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Read Jenkins' build queue and run each build on an agent of its own, on a fresh
    node (the agent is deleted and the node destroyed after its one build)."""
    from freshpool import logs
    from freshpool.integrations.jenkins import config, serve

    settings = config.load(config_path)
    logs.setup(log_level)
    status = settings.status
    err.print(
        f"freshpool jenkins: {settings.jenkins.url}; labels "
        f"{', '.join(k.label for k in settings.labels)}; status at "
        f"http://{status.listen}:{status.port}/status"
    )
    serve.serve(settings, log_dir)


@jenkins_app.command("check")
@friendly
def jenkins_check(config_path: JenkinsConfigOpt) -> None:
    """Check the settings file and that Jenkins accepts the user and its token."""
    from freshpool.integrations.jenkins import config, serve

    settings = config.load(config_path)
    api, version, user = serve.connect(settings)
    prefix = settings.agent.name_prefix
    computers = api.computers()
    ours = sum(1 for c in computers if str(c.get("displayName", "")).startswith(prefix))
    out.print(
        f"ok: Jenkins {version} at {settings.jenkins.url} as {user}; {len(computers)} "
        f"agents, {ours} named {prefix}*"
    )
