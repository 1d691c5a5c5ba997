"""`freshpool doctor` as a person runs it: a real process, this host, a real
PostgreSQL (its clock, its schema) and a provider that cannot work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from freshpool.store import Store
from tests.integrations.buildbot.harness import free_port
from tests.store.pg import TempPostgres


def doctor(config: dict[str, object], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))  # JSON is YAML
    return subprocess.run([sys.executable, "-m", "freshpool", "doctor", "-c", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def base(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "state-dir": str(tmp_path / "state"),
        "providers": [{"name": "local", "driver": "local",
                       "network": {"subnet": "10.214.93.0/24"}}],
        "labels": [{"name": "debian", "image": "debian-bookworm"}],
        "images": [{"name": "debian-bookworm"}],
        **extra,
    }  # fmt: skip


def test_a_host_that_can_run_the_pool_is_all_ok(tmp_path: Path) -> None:
    done = doctor(base(tmp_path), tmp_path / "freshpool.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("ok") and "provider local (local): can run nodes" in line
               for line in lines), lines  # fmt: skip
    assert any("database: SQLite in state-dir" in line for line in lines)
    assert not any(line.startswith("FAIL") for line in lines)


def test_what_cannot_work_is_named_with_what_to_do(postgres: TempPostgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    Store(url).close()  # a schema, as a launcher leaves it
    config = base(tmp_path, **{"database-url": url})
    providers = list(config["providers"])  # type: ignore[call-overload]
    providers.append({"name": "ec2", "driver": "aws", "aws": {
        "region": "us-east-1", "ami": "ami-0123456789abcdef0", "api-timeout": 2,
        "endpoint-url": f"http://127.0.0.1:{free_port()}"}})  # fmt: skip
    config["providers"] = providers
    done = doctor(config, tmp_path / "freshpool.yaml")
    lines = done.stdout.splitlines()
    assert done.returncode != 0 and "1 problem to fix" in done.stderr, done.stdout + done.stderr
    assert any(line.startswith("FAIL") and "provider ec2 (aws)" in line for line in lines), lines
    assert any(line.startswith("ok") and "database schema" in line and "current" in line
               for line in lines), lines  # fmt: skip
    assert any(line.startswith("ok") and "clock: " in line for line in lines), lines

    # A newer freshpool upgraded the database: this one is told to upgrade too.
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    store.close()
    config["providers"] = providers[:1]
    done = doctor(config, tmp_path / "freshpool.yaml")
    assert done.returncode != 0
    assert any(line.startswith("FAIL") and "newer than this freshpool" in line
               for line in done.stdout.splitlines()), done.stdout  # fmt: skip
