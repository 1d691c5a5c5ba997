"""systemd units shipped with freshpool, and the starter files `freshpool init` writes:
a config (the embedded default) and the units, filled in for this host."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from freshpool.core.errors import Refused

UNITS = (
    "freshpool-launcher.service",
    "freshpool-api.service",
    "freshpool-integration@.service",
)


def command() -> str:
    """How a unit runs freshpool here: the console script, else this Python's module."""
    found = shutil.which("freshpool")
    return found or f"{sys.executable} -m freshpool"


def starter_files(config_dir: Path, unit_dir: Path, state_dir: Path) -> dict[Path, str]:
    from freshpool.config import default_text

    config = config_dir / "freshpool.yaml"
    text = default_text().replace("state-dir: /var/lib/freshpool", f"state-dir: {state_dir}", 1)
    files = {config: text}
    for unit in UNITS:
        template = resources.files(__name__).joinpath(unit).read_text()
        files[unit_dir / unit] = template.format(freshpool=command(), config=config,
                                                 config_dir=config_dir)  # fmt: skip
    return files


def write(files: dict[Path, str], force: bool) -> None:
    """Write every file, or none: an existing one is never replaced unless `force`."""
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise Refused(f"{', '.join(existing)} already exist: nothing written (--force replaces)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
