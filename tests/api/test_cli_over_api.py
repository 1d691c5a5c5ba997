"""The CLI talking to `freshpool serve` over HTTP: same commands, same output, real nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.api.conftest import wait_for
from tests.support import Pool


def test_cli_commands_over_the_api(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=2, max_nodes=6)
    serve = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(pool.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url_file = Path(pool.config.state_dir) / "api.url"
        wait_for(url_file.exists, 60, "the API to start")
        wait_for(lambda: len(pool.store.nodes(["ready"])) >= 2, 60, "2 ready nodes")
        url = url_file.read_text().strip()
        made = pool.cli("token", "create", "--tenant", "ci", "--description", "tests")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert token.startswith("fp_") and "not shown again" in made.stderr
        env = {**os.environ, "FRESHPOOL_URL": url, "FRESHPOOL_TOKEN": token}

        got = pool.cli("acquire", "debian", "--json", env=env)
        assert got.returncode == 0, got.stderr
        node = json.loads(got.stdout)
        assert node["state"] == "in-use" and node["ssh"].startswith("ssh -i ")
        assert pool.store.node(node["id"]).tenant == "ci"
        pasted = subprocess.run(
            f"{node['ssh']} -o BatchMode=yes uname -n",
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert pasted.stdout.strip() == node["hostname"], pasted.stderr

        # Plain output: the same three lines as straight on the store.
        text = pool.cli("acquire", "debian", "--url", url, env={**env, "FRESHPOOL_URL": ""})
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        second = int(lines[0].split()[1])
        assert lines[0].startswith(f"node {second} (debian) at 10.")
        assert lines[1].startswith("ssh -i ")
        assert lines[2] == f"release it with: freshpool release {second}"

        listing = pool.cli("list", env=env)
        assert listing.returncode == 0 and "ID" in listing.stdout and "in-use" in listing.stdout
        over_api = {n["id"]: n for n in json.loads(pool.cli("list", "--json", env=env).stdout)}
        direct = {n["id"]: n for n in json.loads(pool.cli("list", "--json").stdout)}
        assert set(over_api[node["id"]]) == set(direct[node["id"]])
        assert over_api[node["id"]]["ssh"] == direct[node["id"]]["ssh"]
        assert pool.cli("ssh", str(node["id"]), "echo", "hi", env=env).stdout.strip() == "hi"

        released = pool.cli("release", str(node["id"]), env=env)
        assert released.returncode == 0, released.stderr
        assert released.stdout.strip() == f"node {node['id']}: used; it will be deleted"
        again = pool.cli("release", str(node["id"]), env=env)
        # Refused while it is used, or gone already once deleted.
        assert (again.returncode, "may not go from 'used'" in again.stderr) == (1, True) or (
            again.returncode,
            f"no node {node['id']}" in again.stderr,
        ) == (2, True), again.stderr

        run = pool.cli(
            "run", "--label", "debian", "--", "sh", "-c", "echo out-$(hostname); exit 7", env=env
        )
        assert run.returncode == 7, run.stderr
        assert run.stdout.startswith("out-debian-")
        ran_on = int(run.stdout.strip().rsplit("-", 1)[1])
        wait_for(lambda: ran_on not in {n.id for n in pool.store.nodes(["in-use"])}, 30, "release")

        held = pool.cli("hold", str(second), env=env)
        assert held.returncode == 0 and held.stdout.strip() == f"node {second}: held"
        gone = pool.cli("delete", str(second), env=env)
        assert gone.returncode == 0 and gone.stdout.strip() == f"node {second}: deleting"

        # Refusals keep the CLI's exit codes.
        unknown = pool.cli("acquire", "nope", "--timeout", "1", env=env)
        assert unknown.returncode == 2
        assert "unknown label 'nope' (known: debian)" in unknown.stderr
        other = pool.cli("hold", "999999", env=env)
        assert other.returncode == 2 and "no node 999999" in other.stderr
        anonymous = pool.cli("acquire", "debian", env={**env, "FRESHPOOL_TOKEN": ""})
        assert anonymous.returncode == 1 and "needs a bearer token" in anonymous.stderr
        nowhere = pool.cli("list", env={**env, "FRESHPOOL_URL": "http://127.0.0.1:9"})
        assert nowhere.returncode == 3 and "cannot reach freshpool" in nowhere.stderr

        listed = pool.cli("token", "list")
        assert "ci" in listed.stdout and token not in listed.stdout
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=60)
    assert "API and dashboard at http://127.0.0.1:" in out
    assert not (Path(pool.config.state_dir) / "api.url").exists()


def test_serve_says_when_the_api_cannot_listen(make_pool: Callable[..., Pool]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        pool = make_pool(min_ready=0, extra=f"api:\n  port: {port}\n")
        result = pool.cli("serve", "--no-build", timeout=60)
    finally:
        taken.close()
    assert result.returncode == 3, result.stderr
    assert f"the API cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "api.enabled: false" in result.stderr
    assert pool.store.nodes() == []
