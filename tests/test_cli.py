"""The `freshpool` command end to end: real processes, real nodes, a real launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from freshpool.drivers import ssh
from freshpool.drivers.base import SshAccess
from tests.support import Pool

FRESHPOOL = [sys.executable, "-m", "freshpool"]


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def serving(make_pool: Callable[..., Pool]) -> Iterator[tuple[Pool, subprocess.Popen]]:
    pool = make_pool(min_ready=2, max_nodes=6)
    proc = subprocess.Popen(
        [*FRESHPOOL, "serve", "--no-build", "--config", str(pool.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: len(pool.store.nodes(["ready"])) >= 2, what="2 ready nodes")
        yield pool, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


# ------------------------------------------------------------------ config


def test_config_validate_names_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  - name: local\n    max-nodes: -3\n    typo: 1\n"
        "labels:\n  - name: x\n    image: nope\nimages:\n  - name: img\n"
    )
    result = subprocess.run(
        [*FRESHPOOL, "config", "validate", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        f"{bad}:3: providers[0].max-nodes: Input should be greater than or equal to 1"
        in result.stderr
    )
    assert f"{bad}:4: providers[0].typo: unknown key" in result.stderr


def test_config_validate_cross_references_and_yaml_syntax(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  - name: local\nlabels:\n  - name: x\n    image: nope\n"
        "images:\n  - name: img\n"
    )
    result = subprocess.run(
        [*FRESHPOOL, "config", "validate", "-c", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert f"{bad}:5: labels[0].image: no image named 'nope' (known: img)" in result.stderr
    bad.write_text("providers: [\n")
    result = subprocess.run(
        [*FRESHPOOL, "config", "validate", "-c", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "not valid YAML" in result.stderr


def test_embedded_default_validates(tmp_path: Path) -> None:
    text = subprocess.run(
        [*FRESHPOOL, "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    path = tmp_path / "freshpool.yaml"
    path.write_text(text)
    result = subprocess.run(
        [*FRESHPOOL, "config", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "ok (1 providers, 1 labels, 1 images)" in result.stdout


# ------------------------------------------------------------ bad conditions


def test_unknown_label_is_named(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=0)
    result = pool.cli("acquire", "nope", "--timeout", "1")
    assert result.returncode == 2
    assert "unknown label 'nope' (known: debian)" in result.stderr


def test_exhausted_pool_times_out_cleanly(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=0)
    result = pool.cli("acquire", "debian", "--timeout", "1")
    assert result.returncode == 4, result.stderr
    assert "no ready debian node within 1 s" in result.stderr
    assert pool.store.nodes() == []
    with pool.store.engine.connect() as conn:
        states = [row[0] for row in conn.exec_driver_sql("SELECT state FROM requests")]
    assert states == ["failed"]


def test_no_image_built_says_how_to_build(make_pool: Callable[..., Pool], tmp_path: Path) -> None:
    pool = make_pool(min_ready=0)
    text = pool.config_path.read_text().replace("debian-bookworm", "other-image")
    other = tmp_path / "other.yaml"
    other.write_text(text)
    result = pool.cli("acquire", "debian", "--timeout", "1", "--config", str(other))
    assert result.returncode == 3
    assert "has no ready build; run `freshpool image build other-image`" in result.stderr


def test_serve_without_bwrap_says_what_to_install(
    make_pool: Callable[..., Pool], tmp_path: Path
) -> None:
    pool = make_pool(min_ready=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "ssh", "ssh-keygen", "mount", "umount"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    result = pool.cli("serve", "--no-build", env=env, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "bwrap" in result.stderr and "bubblewrap" in result.stderr


def test_second_serve_on_same_state_dir_is_refused(serving: tuple[Pool, subprocess.Popen]) -> None:
    pool, _ = serving
    result = pool.cli("serve", "--no-build", timeout=60)
    assert result.returncode == 1
    assert "already runs on" in result.stderr


# -------------------------------------------------------------- using nodes


def test_acquire_ssh_release_run_hold_delete(serving: tuple[Pool, subprocess.Popen]) -> None:
    pool, _ = serving
    got = pool.cli("acquire", "debian", "--json", "--timeout", "30")
    assert got.returncode == 0, got.stderr
    node = json.loads(got.stdout)
    assert node["state"] == "in-use" and node["ssh"].startswith("ssh -i ")
    # The pasted command works as printed.
    pasted = subprocess.run(
        f"{node['ssh']} -o BatchMode=yes uname -n",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert pasted.stdout.strip() == node["hostname"], pasted.stderr
    via_cli = pool.cli("ssh", str(node["id"]), "echo", "from-ssh")
    assert via_cli.stdout.strip() == "from-ssh"

    released = pool.cli("release", str(node["id"]))
    assert released.returncode == 0, released.stderr
    again = pool.cli("release", str(node["id"]))
    assert again.returncode in (1, 2)
    assert "may not go from 'used'" in again.stderr or "no node" in again.stderr
    wait_for(lambda: node["id"] not in {n.id for n in pool.store.nodes()}, what="deletion")

    run = pool.cli("run", "--label", "debian", "--", "sh", "-c", "echo out-$(hostname); exit 7")
    assert run.returncode == 7, run.stderr
    assert run.stdout.startswith("out-debian-")
    ran_on = int(run.stdout.strip().rsplit("-", 1)[1])
    assert pool.store.events(ran_on)[-1].to_state in ("used", "deleting", None)

    held = json.loads(pool.cli("acquire", "debian", "--json").stdout)
    assert pool.cli("hold", str(held["id"])).returncode == 0
    assert pool.store.node(held["id"]).state == "hold"
    assert pool.cli("delete", str(held["id"])).returncode == 0
    wait_for(lambda: held["id"] not in {n.id for n in pool.store.nodes()}, what="delete")

    listing = pool.cli("list")
    assert listing.returncode == 0 and "ready" in listing.stdout and "ID" in listing.stdout
    as_json = json.loads(pool.cli("list", "--json").stdout)
    assert {n["state"] for n in as_json} <= {"ready", "building", "testing", "used", "deleting"}
    show = pool.cli("show", str(held["id"]))
    assert "hold" in show.stdout and "(removed)" in show.stdout


def test_sigterm_stops_cleanly_and_restart_adopts(serving: tuple[Pool, subprocess.Popen]) -> None:
    pool, proc = serving
    ready_before = {n.id for n in pool.store.nodes(["ready"])}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    left = pool.store.nodes()
    assert {n.state for n in left} <= {"ready"}, [(n.id, n.state) for n in left]
    restarted = subprocess.Popen(
        [*FRESHPOOL, "serve", "--no-build", "--config", str(pool.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert restarted.stdout is not None
    lines: list[str] = []
    # Read as it runs: stopping it at a fixed time raced its start-up on a slow host
    # (a SIGTERM before serve handles it ends it silently).
    reader = threading.Thread(target=lambda: lines.extend(restarted.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("adopted" in line for line in lines), 60, "the nodes' adoption")
        assert ready_before <= {n.id for n in pool.store.nodes(["ready"])}
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0
        reader.join(10)


def test_the_api_process_never_outlives_serve(serving: tuple[Pool, subprocess.Popen]) -> None:
    """Even a serve killed with SIGKILL, which cannot stop anything itself."""
    _pool, proc = serving
    # multiprocessing's spawned children (its resource tracker is not one of them).
    fronts = [
        p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())
    ]
    assert len(fronts) == 1, [p.cmdline() for p in fronts]
    proc.kill()
    proc.wait(timeout=10)

    def gone() -> bool:
        try:
            return fronts[0].status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 30, "the API process to exit")


# --------------------------------------------------------------- single use


def test_fifty_concurrent_acquires_never_share_a_node(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=20, max_nodes=20)
    pool.fill(pool.launcher(), 20, timeout=120)
    # No launcher runs from here on, so exactly 20 nodes exist to be handed out.

    def one(_: int) -> subprocess.CompletedProcess[str]:
        return pool.cli("acquire", "debian", "--json", "--timeout", "5", timeout=180)

    with ThreadPoolExecutor(max_workers=50) as workers:
        results = list(workers.map(one, range(50)))
    won = [json.loads(r.stdout)["id"] for r in results if r.returncode == 0]
    lost = [r for r in results if r.returncode != 0]
    assert len(won) == 20 and len(set(won)) == 20
    assert len(lost) == 30
    for r in lost:
        assert r.returncode == 4 and "no ready debian node within 5 s" in r.stderr, r.stderr
    for node_id in won:
        handed = [e for e in pool.store.events(node_id) if e.to_state == "in-use"]
        assert len(handed) == 1
    assert pool.store.nodes(["ready"]) == []
    # Every node is reachable by the one job that got it.
    first = pool.store.node(won[0])
    assert ssh.run(SshAccess(**first.access), "true").returncode == 0
