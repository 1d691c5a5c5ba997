"""Setting a host up: `freshpool init` writes a starter config and systemd units,
`freshpool doctor` checks the host, the config's providers and the database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freshpool.cli.app import ConfigOpt, Exit, app, friendly, out


@app.command("doctor")
@friendly
def doctor(config_path: ConfigOpt = None) -> None:
    """Check what freshpool needs here (root, disk, cgroups, each provider's tools or
    cloud, the database's schema and clock) and say what to fix. Changes nothing."""
    from freshpool import doctor as checks
    from freshpool.config import load

    config = load(config_path)
    problems = 0
    for finding in checks.check(config):
        mark = "ok  " if finding.ok else ("warn" if finding.warning else "FAIL")
        problems += not finding.ok and not finding.warning
        out.print(f"{mark}  {finding.what}: {finding.detail}", highlight=False, soft_wrap=True)
    if problems:
        raise Exit(f"{problems} problem{'s' * (problems != 1)} to fix (FAIL above)")


@app.command("init")
@friendly
def init(
    config_dir: Annotated[Path, typer.Option(help="Where the config goes.")] = Path(
        "/etc/freshpool"
    ),
    unit_dir: Annotated[Path, typer.Option(help="Where the systemd units go.")] = Path(
        "/etc/systemd/system"
    ),
    state_dir: Annotated[Path, typer.Option(help="The config's state-dir.")] = Path(
        "/var/lib/freshpool"
    ),
    force: Annotated[bool, typer.Option(help="Replace files that exist.")] = False,
) -> None:
    """Write a starter config (the embedded default) and systemd units for this host."""
    from freshpool import systemd

    files = systemd.starter_files(config_dir, unit_dir, state_dir)
    systemd.write(files, force)
    for path in files:
        out.print(f"wrote {path}", highlight=False)
    out.print(
        f"next: edit {config_dir / 'freshpool.yaml'}, then `freshpool doctor -c "
        f"{config_dir / 'freshpool.yaml'}` and `systemctl daemon-reload && systemctl enable "
        "--now freshpool-launcher` (an API server on another host: freshpool-api)",
        highlight=False,
    )
