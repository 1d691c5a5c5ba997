"""A CI server on another machine: the job's own SSH key, the node's host keys to pin.

Real local nodes behind a real API. The "other machine" is this test holding a key
pair of its own, which the pool has never seen, and pinning the host key the API
returned (not the pool's known_hosts file, which a remote client does not have).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from freshpool.drivers import ssh
from freshpool.drivers.base import SshAccess
from tests.api.conftest import Served, wait_for


def _job_key(where: Path) -> tuple[Path, str]:
    key = where / "job_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci@elsewhere", "-f", str(key)],
        check=True,
    )
    return key, key.with_suffix(".pub").read_text().strip()


def _as_remote_client(
    node: dict, key: Path, where: Path, command: str
) -> subprocess.CompletedProcess[str]:
    access = node["access"]
    known = where / f"known-{node['id']}"
    known.write_text("".join(f"{access['host']} {k}\n" for k in access["host_keys"]))
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known}",
         "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-p", str(access["port"]), f"{access['user']}@{access['host']}", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_jobs_key_logs_in_and_the_host_key_pins(
    serve_pool: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_pool(min_ready=2, max_nodes=4)
    served.wait_ready(2)
    key, public = _job_key(tmp_path)
    api = served.client("ci")
    got = api.post(
        "/requests",
        params={"wait": 60},
        json={"labels": ["debian", "debian"], "ssh_keys": [public]},
    )
    assert got.status_code == 201, got.text
    request = got.json()
    assert request["state"] == "fulfilled", request
    for node in request["nodes"]:
        access = node["access"]
        assert access["user"] == "root" and len(access["host_keys"]) == 1
        assert access["host_keys"][0].startswith("ssh-ed25519 ")
        done = _as_remote_client(node, key, tmp_path, "hostname")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == node["hostname"]
    # The key is the job's, not the image's: a ready node still has only the pool's.
    ready = wait_for(lambda: served.pool.store.nodes(["ready"]), 60, "a ready node")[0]
    listed = ssh.run(SshAccess(**ready.access), "cat /root/.ssh/authorized_keys").stdout
    assert public.split()[1] not in listed


GOOD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIXvqDvadsx2yMWY0yG/vacNDvvRsvtv6EO4IlBi/syN"


def test_a_bad_key_is_refused_by_field_and_nothing_is_queued(
    serve_pool: Callable[..., Served],
) -> None:
    served = serve_pool(min_ready=0)
    api = served.client("ci")
    before = len(served.pool.store.list_requests())
    for bad, says in (
        ('command="rm -rf /" ssh-ed25519 AAAA', "options are not accepted"),
        ("ssh-ed25519 not-base64!", "bad base64"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "is not a public key type"),
        ("ssh-rsa " + GOOD.split()[1], "is a 'ssh-ed25519' key"),
    ):  # fmt: skip
        got = api.post(
            "/requests",
            json={
                "labels": ["debian"],
                "ssh_keys": [
                    GOOD,
                    bad,
                ],
            },
        )
        assert got.status_code == 422, got.text
        (problem,) = got.json()["detail"]
        assert problem["loc"] == ["body", "ssh_keys", 1], problem
        assert says in problem["msg"], problem
    assert len(served.pool.store.list_requests()) == before


def test_a_set_that_cannot_take_the_keys_is_cancelled_not_handed_over(
    serve_pool: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_pool(min_ready=1, max_nodes=2)
    served.wait_ready(1)
    (node,) = served.pool.store.nodes(["ready"])
    # The node's sshd no longer lets the pool in, so the job's key cannot be added.
    broken = ssh.run(SshAccess(**node.access), "mv /root/.ssh/authorized_keys /root/moved")
    assert broken.returncode == 0, broken.stderr
    _, public = _job_key(tmp_path)
    got = served.client("ci").post(
        "/requests", params={"wait": 60}, json={"labels": ["debian"], "ssh_keys": [public]}
    )
    assert got.status_code == 201, got.text
    request = got.json()
    assert request["state"] == "cancelled", request
    assert request["reason"].startswith("cannot install the job's SSH keys: node")
    assert request["nodes"] == [] or all(n["state"] != "in-use" for n in request["nodes"])
    wait_for(lambda: node.id not in {n.id for n in served.pool.store.nodes()}, 60, "deletion")
    steps = [(e.from_state, e.to_state) for e in served.pool.store.events(node.id)]
    assert ("in-use", "deleting") in steps and ("in-use", "ready") not in steps
