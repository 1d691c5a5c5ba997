"""`freshpool init` as an operator runs it: a starter config that validates, and
systemd units that systemd itself accepts (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def freshpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "freshpool", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def test_init_writes_a_config_and_units_and_never_overwrites(tmp_path: Path) -> None:
    etc, units, state = tmp_path / "etc", tmp_path / "units", tmp_path / "state"
    args = ["init", "--config-dir", str(etc), "--unit-dir", str(units), "--state-dir", str(state)]
    done = freshpool(*args)
    assert done.returncode == 0, done.stderr
    config = etc / "freshpool.yaml"
    assert f"state-dir: {state}" in config.read_text()
    valid = freshpool("config", "validate", "-c", str(config))
    assert valid.returncode == 0, valid.stderr

    service = (units / "freshpool-launcher.service").read_text()
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(program).exists() and f"serve -c {config}" in exec_start
    assert "KillMode=process" in service  # nodes outlive a restart of the service
    api = (units / "freshpool-api.service").read_text()
    assert f"serve --api-only -c {config}" in api

    # Someone's edited config is never replaced by a second init.
    config.write_text(config.read_text() + "# mine\n")
    again = freshpool(*args)
    assert again.returncode != 0 and "already exist" in again.stderr
    assert config.read_text().endswith("# mine\n")
    assert freshpool(*args, "--force").returncode == 0
    assert not config.read_text().endswith("# mine\n")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_units_are_ones_systemd_accepts(tmp_path: Path) -> None:
    units = tmp_path / "units"
    done = freshpool("init", "--config-dir", str(tmp_path / "etc"), "--unit-dir", str(units))
    assert done.returncode == 0, done.stderr
    # A template is verified through an instance of it.
    shutil.copy(
        units / "freshpool-integration@.service", units / "freshpool-integration@github.service"
    )
    for unit in (
        "freshpool-launcher.service",
        "freshpool-api.service",
        "freshpool-integration@github.service",
    ):
        verify = ["systemd-analyze", "verify", str(units / unit)]
        verified = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
        assert verified.returncode == 0, verified.stderr
        assert unit.split("@")[0] not in verified.stderr, verified.stderr
