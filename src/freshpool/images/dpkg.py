"""Ask dpkg which packages an image has installed."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from freshpool.images.errors import CommandFailed


def architecture() -> str:
    """The host's dpkg architecture, which is the one its images are built for."""
    result = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or os.uname().machine


def installed_in(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Installed packages of the root file system `root`, name to version.

    Raises CommandFailed when dpkg-query cannot read its database.
    """
    admin = root / "var/lib/dpkg"
    fmt = "${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Version}\n"
    result = subprocess.run(
        ["dpkg-query", f"--admindir={admin}", "-W", "-f", fmt],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise CommandFailed("dpkg-query", result.returncode, result.stderr.splitlines())
    native = architecture()
    installed: dict[str, str] = {}
    for line in result.stdout.splitlines():
        status, name, arch, version = line.split("\t")
        if status.startswith("ii"):
            # Qualified only when foreign, so the usual single-arch list reads plainly.
            installed[name if arch in (native, "all") else f"{name}:{arch}"] = version
    return installed


def installed_by_status(status: Path) -> dict[str, str]:
    """Installed packages by a dpkg status file alone, name to version, sorted by name.

    A layer stack has no one directory that holds the whole dpkg database, but the
    topmost status file is the whole answer.
    """
    with tempfile.TemporaryDirectory() as admin:
        Path(admin, "status").write_bytes(status.read_bytes())
        Path(admin, "updates").mkdir()
        Path(admin, "info").mkdir()
        fmt = "${db:Status-Abbrev}\t${Package}\t${Version}\n"
        result = subprocess.run(
            ["dpkg-query", f"--admindir={admin}", "-W", "-f", fmt],
            capture_output=True,
            text=True,
            check=False,
        )
    installed = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].startswith("ii"):
            installed[parts[1]] = parts[2]
    return dict(sorted(installed.items()))
