"""`freshpool doctor`: check this host, the config's providers and the database."""

from __future__ import annotations

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
