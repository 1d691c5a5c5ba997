"""`freshpool usage` and `freshpool tco` on a store with a known history."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from freshpool.store import Store
from tests.store.test_usage import lived


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "freshpool.yaml"
    path.write_text(f"""
state-dir: {tmp_path}
providers:
  - {{name: p, driver: sim, label-cost-per-hour: {{a: 0.5}}}}
  - {{name: q, driver: sim}}
labels: [{{name: a, image: i}}]
images: [{{name: i}}]
""")
    store = Store.open(tmp_path)
    lived(store)
    store.close()
    return path


def freshpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freshpool", *args], capture_output=True, text=True, timeout=120
    )


def test_usage_as_json_csv_and_table(config: Path) -> None:
    got = freshpool("usage", "--since", "0", "--json", "-c", str(config))
    assert got.returncode == 0, got.stderr
    rows = {r["group"]: r for r in json.loads(got.stdout)["rows"]}
    assert rows["team-x"]["hours"] == {"idle": 0.0, "in-use": 1.0, "overhead": 60 / 3600}
    got = freshpool("usage", "--since", "0", "--by", "label", "--csv", "-c", str(config))
    table = list(csv.reader(io.StringIO(got.stdout)))
    assert table[0] == [
        "label",
        "node_hours",
        "idle_hours",
        "in_use_hours",
        "overhead_hours",
        "cost",
    ]
    assert [r[0] for r in table[1:]] == ["a", "(total)"]
    got = freshpool("usage", "--since", "0", "-c", str(config))
    assert "team-x" in got.stdout and "(pool)" in got.stdout


def test_tco_shows_unknown_not_zero(config: Path) -> None:
    args = ("tco", "--host-cost", "900", "--host-capacity", "4", "-c", str(config))
    got = json.loads(freshpool(*args, "--json").stdout)
    costs = {o["name"]: o["cost"] for o in got["options"]}
    assert costs["q"] is None and costs["p"] is not None and got["hosts"] == 1
    table = freshpool(*args).stdout
    (q,) = [line for line in table.splitlines() if line.split()[1:2] == ["q"]]
    assert "unknown" in q


def test_bad_since_and_by_are_named(config: Path) -> None:
    got = freshpool("usage", "--since", "last tuesday", "-c", str(config))
    assert got.returncode != 0 and "--since 'last tuesday'" in got.stderr
    got = freshpool("usage", "--by", "colour", "-c", str(config))
    assert got.returncode != 0 and "--by 'colour'" in got.stderr
