"""`freshpool import nodepool` on a config shaped like Nodepool's documented ones
(nodepool-openstack.yaml, written for these tests): what maps, what becomes a TODO
with its line, and that the output is a freshpool config that validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from freshpool.config import parse
from freshpool.importer.nodepool import convert

SAMPLE = Path(__file__).with_name("nodepool-openstack.yaml")


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def provider(config: Any, name: str) -> Any:
    return next(p for p in config.providers if p.name == name)


def test_a_nodepool_config_becomes_a_freshpool_one() -> None:
    imported = convert(SAMPLE.read_text())
    config = parse(imported.text(), "imported.yaml")  # validates, or raises naming the key

    assert {x.name: x.min_ready for x in config.labels} == {
        "debian-bookworm": 4, "debian-bookworm-large": 0, "ubuntu-noble": 2, "fedora-40": 1,
        "static-arm": 0}  # fmt: skip
    assert next(x for x in config.labels if x.name == "debian-bookworm-large").max_ready_age == 3600

    east = provider(config, "cloud-east")
    assert east.driver == "openstack" and east.max_nodes == 50
    assert east.rate == 10.0  # Nodepool's 0.1 s between calls
    assert east.boot_timeout == 240
    assert east.openstack.cloud == "east" and east.openstack.region == "RegionOne"
    assert east.openstack.networks == ["ci-private"] and east.openstack.max_cores == 200
    assert east.openstack.flavors["debian-bookworm"].name == "ci.standard.4"
    assert east.openstack.flavors["debian-bookworm-large"].min_ram == 16384
    assert east.openstack.images["ubuntu-noble"] == "ubuntu-24.04-server"
    assert east.openstack.metadata == {"owner": "ci"}

    # One freshpool provider per pool when a provider has several.
    west = [p.name for p in config.providers if p.name.startswith("cloud-west")]
    assert west == ["cloud-west-a", "cloud-west-b"]
    assert provider(config, "cloud-west-b").max_nodes == 5

    aws = provider(config, "aws-us-east-1")
    assert aws.driver == "aws" and aws.rate == 0.5 and aws.aws.spot
    assert aws.aws.amis == {"fedora-40": "ami-0123456789abcdef0"}
    assert aws.aws.instance_types == {"fedora-40": "t3.large"}
    assert aws.aws.subnet_id == "subnet-0123456789abcdef0" and aws.aws.address == "public"

    bookworm = next(i for i in config.images if i.name == "debian-bookworm")
    assert bookworm.suite == "bookworm" and bookworm.packages == ["git", "python3", "make"]
    assert bookworm.env == {"DIB_CHECKSUM": "1"} and bookworm.rebuild_age == 86400
    assert not any(i.name == "base" for i in config.images)  # abstract: merged, not built


def test_what_does_not_map_is_a_todo_with_its_line() -> None:
    text = SAMPLE.read_text()
    todos = convert(text).todos
    expected = {
        line_of(text, "key-name: infra-root-keys"): "key-name is not used",
        line_of(text, "launch-timeout"): "launch-timeout has no freshpool key",
        line_of(text, "driver: static") - 1: "freshpool has no static driver",
        line_of(text, "elements: [debian-minimal"): "elements cache-devstack",
        line_of(text, "diskimage: debian-bookworm"): "freshpool does not upload builds",
    }
    for line, words in expected.items():
        assert any(t.startswith(f"nodepool.yaml:{line}:") and words in t for t in todos), (
            line, words, todos)  # fmt: skip
    # Elements that only make a bootable disk are not TODOs: freshpool needs none.
    assert not any("simple-init" in t or "nodepool-base" in t for t in todos)


def test_the_command_writes_the_file_and_refuses_what_is_not_nodepool(tmp_path: Path) -> None:
    out = tmp_path / "freshpool.yaml"
    done = subprocess.run([sys.executable, "-m", "freshpool", "import", "nodepool", str(SAMPLE),
                           "--out", str(out)], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "TODOs at its top" in done.stderr and "does not validate" not in done.stderr
    assert out.read_text().startswith("# Imported from nodepool.yaml")

    bad = tmp_path / "not-nodepool.yaml"
    bad.write_text("- just\n- a list\n")
    refused = subprocess.run([sys.executable, "-m", "freshpool", "import", "nodepool", str(bad)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 2 and "not a Nodepool config" in refused.stderr, refused.stderr
