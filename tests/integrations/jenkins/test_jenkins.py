"""Jenkins builds run on freshpool nodes through single-use inbound agents: one build
per agent and node, the agent taken out of its label as its build starts (the seed's
`-used` relabelling), deleted from Jenkins and its node destroyed after it.

Jenkins is emulated (fake_jenkins.py says how; agent.jar's remoting channel is the
one part replaced, by the stand-in agent in agent/agent.py); the pool, its nodes, SSH,
the network policy and `freshpool jenkins serve` are real.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable

import pytest

from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.jenkins.api import JenkinsApi, parse_secret, queued_label
from freshpool.integrations.jenkins.config import JenkinsSettings
from tests.api.conftest import wait_for
from tests.integrations.jenkins.conftest import Integration, freshpool_jenkins
from tests.integrations.jenkins.fake_model import FakeBuild, QueueItem

# Each build proves its node is fresh (no earlier build left its mark), and lasts long
# enough that a second build would have had every chance to land on the same agent.
FRESH = "test ! -e /var/tmp/jk-used && touch /var/tmp/jk-used && hostname && sleep 2"


def ended(it: Integration, *items: QueueItem) -> bool:
    builds = [it.jenkins.build_of(i) for i in items]
    return all(b is not None and b.result is not None for b in builds)


def build(it: Integration, item: QueueItem) -> FakeBuild:
    found = it.jenkins.build_of(item)
    assert found is not None, f"queue item {item.id} never started"
    return found


def test_each_build_runs_on_its_own_fresh_agent_and_node(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    items = [it.jenkins.queue_build("linux", FRESH, job=f"ok{i}") for i in range(2)]
    items.append(it.jenkins.queue_build("linux", f"{FRESH}; exit 3", job="bad"))
    wait_for(lambda: ended(it, *items), 240, "three builds ended")

    builds = [build(it, i) for i in items]
    assert [b.result for b in builds] == ["SUCCESS", "SUCCESS", "FAILURE"]
    hosts = {b.output.strip().splitlines()[-1] for b in builds}
    assert len(hosts) == 3, hosts  # three distinct nodes
    agents = {b.built_on for b in builds}
    assert len(agents) == 3 and all(a.startswith("freshpool-linux-") for a in agents)
    for b in builds:
        # Out of the label and offline before its build ended: Jenkins could not have
        # scheduled a second build there.
        assert b.agent_at_end == ("linux-used", True), b
    every = list(it.jenkins.builds.values())
    assert len({b.built_on for b in every}) == len(every) == 3  # no agent ran two

    wait_for(lambda: not it.nodes_in_use(), 120, "no node in use")
    wait_for(lambda: not it.jenkins.agents, 60, "no agent registered")
    assert sorted(it.jenkins.deleted) == sorted(agents)
    status = it.status()
    assert status["builds_run"] == 3
    assert status["agents"] == []


def test_idle_agents_wait_for_builds_and_each_still_takes_one(
    integration: Callable[..., Integration],
) -> None:
    it = integration(labels=[{"label": "linux", "node-label": "debian", "min-idle": 2,
                              "max": 4}])  # fmt: skip
    wait_for(lambda: sum(a.connected for a in it.jenkins.agents.values()) >= 2, 120,
             "two idle agents online")  # fmt: skip
    items = [it.jenkins.queue_build("linux", FRESH, job=f"j{i}") for i in range(3)]
    wait_for(lambda: ended(it, *items), 240, "three builds ended")
    builds = [build(it, i) for i in items]
    assert len({b.built_on for b in builds}) == 3
    assert all(b.result == "SUCCESS" for b in builds)

    # The pool of idle agents is made whole again with new agents on new nodes.
    def whole_again() -> bool:
        agents = list(it.jenkins.agents.values())
        return not any(a.builds for a in agents) and sum(a.connected for a in agents) >= 2

    wait_for(whole_again, 120, "only fresh idle agents again")


def test_orphans_are_removed_and_a_failing_jenkins_is_retried(
    integration: Callable[..., Integration],
) -> None:
    it = integration()
    it.jenkins.add_agent("freshpool-linux-deadbeef", "linux")
    it.jenkins.add_agent("their-agent", "linux")
    wait_for(lambda: "freshpool-linux-deadbeef" not in it.jenkins.agents, 30, "orphan gone")
    assert "their-agent" in it.jenkins.agents  # not ours: never touched
    assert it.status()["orphans_removed"] == 1

    it.jenkins.failing = 3  # Jenkins restarting: 503s
    item = it.jenkins.queue_build("linux", FRESH)
    wait_for(lambda: ended(it, item), 180, "the build ran despite the 503s")
    assert build(it, item).result == "SUCCESS"
    assert it.jenkins.requests_failed == 3
    assert it.status()["jenkins"]["retries"] >= 3
    assert it.status()["jenkins"]["healthy"]


def test_an_agent_that_never_connects_loses_its_node_and_registration(
    integration: Callable[..., Integration],
) -> None:
    it = integration(**{"agent-timeout": 5, "agent": {"command": "sleep 600"}})
    item = it.jenkins.queue_build("linux", FRESH)

    seen_nodes: set[int] = set()
    seen_agents: set[str] = set()

    def replaced() -> bool:
        seen_nodes.update(it.nodes_in_use())
        seen_agents.update(it.jenkins.agents)
        given_up = {a for a in seen_agents if a in it.jenkins.deleted}
        return len(seen_nodes) >= 2 and len(given_up) >= 1

    wait_for(replaced, 120, "an agent given up on and its node replaced")
    given_up = next(a for a in seen_agents if a in it.jenkins.deleted)
    assert given_up not in it.jenkins.agents
    assert it.jenkins.build_of(item) is None  # the build still waits, not lost
    assert any(q.id == item.id for q in it.jenkins.queue)


def test_a_build_past_its_timeout_is_aborted_and_its_node_destroyed(
    integration: Callable[..., Integration],
) -> None:
    it = integration(labels=[{"label": "linux", "node-label": "debian", "job-timeout": 3}])
    item = it.jenkins.queue_build("linux", "hostname; sleep 600")
    wait_for(lambda: ended(it, item), 120, "the build ended")
    assert build(it, item).result == "ABORTED"
    wait_for(lambda: not it.nodes_in_use(), 60, "no node in use")
    wait_for(lambda: not it.jenkins.agents, 60, "no agent registered")


def test_check_names_what_jenkins_refused(integration: Callable[..., Integration]) -> None:
    it = integration(serve=False)
    good = freshpool_jenkins("check", "-c", str(it.config))
    assert good.returncode == 0, good.stderr
    assert "ok: Jenkins 2.479.2" in good.stdout, good.stdout

    it.jenkins.token = "another"
    refused = freshpool_jenkins("check", "-c", str(it.config))
    assert refused.returncode != 0
    assert "401" in refused.stderr and "jenkins.token" in refused.stderr, refused.stderr

    settings = json.loads(it.config.read_text())
    settings["labels"] = [{"label": "linux", "node-label": "debian", "min-idle": 5, "max": 2}]
    it.config.write_text(json.dumps(settings, indent=2))
    bad = freshpool_jenkins("check", "-c", str(it.config))
    assert bad.returncode != 0
    assert "min-idle" in bad.stderr and "jenkins.yaml:" in bad.stderr, bad.stderr

    settings["labels"] = [{"label": "linux-used", "node-label": "debian"}]
    it.config.write_text(json.dumps(settings, indent=2))
    used = freshpool_jenkins("check", "-c", str(it.config))
    assert used.returncode != 0 and "-used" in used.stderr, used.stderr


def test_the_queue_reason_names_the_label_waited_for() -> None:
    assert queued_label({"why": "Waiting for next available executor on \u2018linux\u2019"}) == (
        "linux"
    )
    assert queued_label({"why": "There are no nodes with the label \u2018arm64\u2019"}) == "arm64"
    assert queued_label({"why": "All nodes of label 'big' are offline"}) == "big"
    assert queued_label({"why": "Build #3 is already in progress", "blocked": True}) is None
    assert queued_label({"why": "In the quiet period. Expires in 4.9 sec"}) is None


def test_the_agent_secret_is_read_from_the_jnlp_file() -> None:
    jnlp = (
        "<jnlp><application-desc main-class='hudson.remoting.jnlp.Main'>"
        "<argument>cafe01</argument><argument>agent-1</argument></application-desc></jnlp>"
    )
    assert parse_secret(jnlp) == "cafe01"
    with pytest.raises(CiServerError, match="no secret"):
        parse_secret("<jnlp><application-desc/></jnlp>")
    with pytest.raises(CiServerError, match="not XML"):
        parse_secret("<html>login</html")


LIVE = all(os.environ.get(v) for v in ("JENKINS_URL", "JENKINS_USER", "JENKINS_TOKEN"))


@pytest.mark.skipif(not LIVE, reason="live Jenkins: set JENKINS_URL, JENKINS_USER, JENKINS_TOKEN")
def test_live_jenkins_takes_an_agent_through_its_life() -> None:
    """Against a real Jenkins, when an operator gives its address and a user's token:
    the calls an agent's life makes (create, secret, take out of its label, delete)
    are accepted, and the agent is gone afterwards. No build is run."""
    settings = JenkinsSettings.model_validate({
        "url": os.environ["JENKINS_URL"], "user": os.environ["JENKINS_USER"],
        "token-env": "JENKINS_TOKEN"})  # fmt: skip
    api = JenkinsApi(settings)
    api.check()
    name = f"freshpool-live-{secrets.token_hex(4)}"
    try:
        api.create_agent(name, "freshpool-live", "freshpool's live test", "/tmp/freshpool-live")
        assert len(api.secret(name)) >= 32
        api.take_out(name, "freshpool-live")
        info = api.computer(name)
        assert info is not None and info["temporarilyOffline"]
        labels = {x["name"] for x in info.get("assignedLabels", [])}
        assert "freshpool-live-used" in labels and "freshpool-live" not in labels, labels
    finally:
        api.delete_agent(name)
    assert api.computer(name) is None
