"""GitHub Actions jobs run on freshpool nodes through just-in-time runners: one job per
node, the node destroyed after it, the runner's registration gone from GitHub.

GitHub is emulated (fake_github.py says how); the pool, its nodes, SSH, the network
policy and `freshpool github serve` are real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.api.conftest import wait_for
from tests.integrations.github.conftest import (
    LABELS,
    WEBHOOK_SECRET,
    Integration,
    freshpool_github,
)
from tests.integrations.github.fake_github import sign

# Each job proves its node is fresh: no earlier job left its mark.
FRESH = "test ! -e /var/tmp/gh-used && touch /var/tmp/gh-used && hostname"


def done(it: Integration, *jobs: int) -> bool:
    return all(it.github.jobs[j].status == "completed" for j in jobs)


def destroyed(it: Integration, node_ids: set[int]) -> bool:
    nodes = {n.id: n.state for n in it.served.pool.store.nodes() if n.id in node_ids}
    return all(state == "deleting" for state in nodes.values())


def test_each_job_runs_on_its_own_fresh_node_and_leaves_nothing_behind(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    passing = [it.github.queue(LABELS, FRESH, name=f"ok{i}") for i in range(2)]
    failing = it.github.queue(LABELS, f"{FRESH}; exit 3", name="bad")
    jobs = [j.id for j in [*passing, failing]]
    wait_for(lambda: done(it, *jobs), 240, "three jobs completed")

    assert [it.github.jobs[j.id].conclusion for j in passing] == ["success", "success"]
    assert it.github.jobs[failing.id].conclusion == "failure"
    hosts = {it.github.jobs[j].output.strip().splitlines()[-1] for j in jobs}
    assert len(hosts) == 3, hosts  # three distinct nodes
    runners = {it.github.jobs[j].runner_name for j in jobs}
    assert len(runners) == 3 and all(r and r.startswith("freshpool-") for r in runners)

    # Nodes released (so destroyed) and every registration gone from GitHub.
    wait_for(lambda: not it.nodes_in_use(), 120, "no node in use")
    wait_for(lambda: not it.github.runners, 60, "no runner registered")
    status = it.status()
    assert status["jobs_served"] == 3
    assert status["runners"] == []
    assert status["queued_jobs"] == {}


def test_a_job_no_webhook_told_of_is_found_by_the_reconcile(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    it.github.send_webhooks = False  # GitHub could not reach us, or we were down
    job = it.github.queue(LABELS, FRESH)
    wait_for(lambda: done(it, job.id), 180, "the job completed")
    assert it.github.jobs[job.id].conclusion == "success"
    wait_for(lambda: not it.github.runners, 60, "no runner registered")


def test_jobs_for_other_runners_and_bad_webhooks_take_no_node(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    # Labels only GitHub's defaults, or one we do not serve: not ours to run.
    it.github.queue(["self-hosted", "linux"])
    it.github.queue(["self-hosted", "gpu"])

    # A delivery whose signature does not match is refused and acted on never.
    body = b'{"action": "queued"}'
    hook = it.github.hook_url
    assert hook is not None
    forged = httpx.post(hook, content=body, headers={
        "X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": "forged-1",
        "X-Hub-Signature-256": sign("not the secret", body)})  # fmt: skip
    assert forged.status_code == 401
    unsigned = httpx.post(hook, content=body, headers={"X-GitHub-Event": "workflow_job"})
    assert unsigned.status_code == 401
    # Signed, but not a workflow_job payload: a clear 400.
    broken = httpx.post(hook, content=body, headers={
        "X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": "broken-1",
        "X-Hub-Signature-256": sign(WEBHOOK_SECRET, body)})  # fmt: skip
    assert broken.status_code == 400 and "workflow_job" in broken.json()["message"]

    # Two reconcile passes later still nothing was started.
    passes = it.status()["reconcile"]["passes"]
    wait_for(lambda: it.status()["reconcile"]["passes"] >= passes + 2, 30, "two reconciles")
    assert it.status()["webhooks"]["bad_signature"] == 2
    assert not it.github.runners and not it.nodes_in_use()
    assert it.status()["runners"] == []


def test_ghost_registrations_are_removed_and_rate_limits_waited_out(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    ghost = it.github.add_offline_runner("freshpool-deadbeef00")
    someone_elses = it.github.add_offline_runner("their-runner")
    wait_for(lambda: ghost.id not in it.github.runners, 30, "the ghost runner removed")
    assert someone_elses.id in it.github.runners  # not ours: never touched
    assert it.status()["orphans_removed"] == 1

    # A spent rate limit (403, x-ratelimit-remaining: 0) is waited out, not an error.
    it.github.rate_limited = 2
    job = it.github.queue(LABELS, FRESH)
    wait_for(lambda: done(it, job.id), 180, "the job completed despite the rate limit")
    assert it.github.rate_limited == 0
    assert it.status()["github"]["retries"] >= 2


def test_a_runner_that_never_connects_loses_its_node_and_registration(
    integration: Callable[..., Integration],
) -> None:
    it = integration(**{"agent-timeout": 5, "runner": {"command": "sleep 600"}})
    job = it.github.queue(LABELS, FRESH)

    seen: set[int] = set()

    def replaced() -> bool:
        seen.update(it.nodes_in_use())
        return len(seen) >= 3 and destroyed(it, set(sorted(seen)[:2]))

    wait_for(replaced, 120, "two nodes given up on")
    # At most the try in flight is registered; the job is still queued, not lost.
    assert len(it.github.runners) <= 1
    assert it.github.jobs[job.id].status == "queued"


def test_check_names_what_github_refused(integration: Callable[..., Integration]) -> None:
    it = integration(serve=False)
    good = freshpool_github("check", "-c", str(it.config))
    assert good.returncode == 0, good.stderr
    assert "octo-org/octo-repo" in good.stdout and "runner group" in good.stdout

    it.github.token = "another"
    refused = freshpool_github("check", "-c", str(it.config))
    assert refused.returncode != 0
    assert "401" in refused.stderr and "github.token" in refused.stderr, refused.stderr

    it.config.write_text(
        it.config.read_text().replace('"reconcile-interval": 2', '"reconcile-interval": "soon"')
    )
    bad = freshpool_github("check", "-c", str(it.config))
    assert bad.returncode != 0
    assert "reconcile-interval" in bad.stderr and "github.yaml:" in bad.stderr, bad.stderr


def test_a_github_app_authenticates_with_installation_tokens(
    integration: Callable[..., Integration], tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    key_file = tmp_path / "app.pem"
    key_file.write_bytes(pem)
    it = integration(serve=False)
    it.github.app_id, it.github.app_public_key = "123456", key.public_key()
    settings = json.loads(it.config.read_text())
    app = {"app-id": "123456", "private-key-file": str(key_file)}
    settings["github"] = {"repository": "octo-org/octo-repo", "api-url": it.github.url, "app": app}
    it.config.write_text(json.dumps(settings))
    good = freshpool_github("check", "-c", str(it.config))
    assert good.returncode == 0, good.stderr
    assert len(it.github.installation_tokens) == 1  # runners were read with it

    # Another App's key: GitHub refuses the JWT, and the error says which settings.
    it.github.app_public_key = rsa.generate_private_key(65537, 2048).public_key()
    refused = freshpool_github("check", "-c", str(it.config))
    assert refused.returncode != 0
    assert "github.app" in refused.stderr and "123456" in refused.stderr, refused.stderr


LIVE = os.environ.get("FRESHPOOL_GITHUB_LIVE_CONFIG")


@pytest.mark.skipif(not LIVE, reason="live GitHub: FRESHPOOL_GITHUB_LIVE_CONFIG names no file")
def test_live_github_accepts_the_settings() -> None:
    """Against the real GitHub, when an operator gives a settings file with credentials:
    the token (or App) may manage the runners and the runner group exists."""
    checked = freshpool_github("check", "-c", str(LIVE))
    assert checked.returncode == 0, checked.stderr
