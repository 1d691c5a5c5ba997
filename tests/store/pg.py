"""A throwaway PostgreSQL server for the tests: initdb in a temp dir, unix socket only."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class TempPostgres:
    """Runs as the `postgres` user (the server refuses root); no TCP port is opened."""

    def __init__(self) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="freshpool-pg-"))
        self.data = self.root / "data"
        self.socket = self.root / "sock"
        self.socket.mkdir()
        shutil.chown(self.root, "postgres", "postgres")
        shutil.chown(self.socket, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]
        )
        self._as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-w",
                "-o",
                f"-k {self.socket} -c listen_addresses='' -c fsync=off -c max_connections=300",
                "start",
            ]
        )
        self._dbs = 0

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True
        )

    def new_database(self) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        self._dbs += 1
        name = f"freshpool_{self._dbs}_{int(time.time() * 1000) % 100000}"
        self._as_postgres([str(self.bindir / "createdb"), "-h", str(self.socket), name])
        return f"postgresql+psycopg://postgres@/{name}?host={self.socket}"

    def stop(self) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)
