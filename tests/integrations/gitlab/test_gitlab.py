"""GitLab jobs through freshpool's custom executor, stage by stage (conftest.py says
what stands in for gitlab-runner)."""

from __future__ import annotations

import json
import re
import signal
import time

from tests.api.conftest import wait_for
from tests.integrations.gitlab.conftest import (
    BUILD_FAILURE,
    STAGES,
    SYSTEM_FAILURE,
    Runner,
    gone,
)


def node_of(prepared: str) -> int:
    found = re.search(r"freshpool node (\d+)", prepared)
    assert found, prepared
    return int(found.group(1))


def test_a_job_runs_all_its_stages_on_one_fresh_node_that_is_destroyed(runner: Runner) -> None:
    job = next(runner.job_ids)
    config = runner.call(job, "config")
    assert config.returncode == 0, config.stderr
    said = json.loads(config.stdout)
    assert said["builds_dir"] == "/builds" and said["builds_dir_is_shared"] is False
    assert said["driver"]["name"] == "freshpool"

    prepared = runner.call(job, "prepare")
    assert prepared.returncode == 0, prepared.stderr
    node = node_of(prepared.stdout)
    assert runner.served.pool.store.node(node).state == "in-use"

    outputs = {}
    for stage in STAGES:
        body = f"echo stage {stage} on $(hostname)"
        if stage == "get_sources":
            body += "\nmkdir -p /builds/group/project && echo source > /builds/group/project/f"
        if stage == "step_script":
            # The fresh-node check: no job before this one left its mark.
            body += "\ntest ! -e /var/tmp/gitlab-was-here && touch /var/tmp/gitlab-was-here"
            body += "\ncat /builds/group/project/f; echo to stderr >&2"
        done = runner.run(job, stage, body)
        assert done.returncode == 0, (stage, done.stdout, done.stderr)
        outputs[stage] = done.stdout
    hostnames = {o.split()[2] for o in outputs.values()}
    assert len(hostnames) == 1, outputs
    # Files of one stage are there in the next: the stages share the node.
    assert "source" in outputs["step_script"], outputs["step_script"]

    cleaned = runner.call(job, "cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    wait_for(lambda: gone(runner.served, node), 60, f"node {node} destroyed")

    # The next job gets another node, fresh: the mark of the last one is not on it.
    job2 = next(runner.job_ids)
    prepared = runner.call(job2, "prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert node_of(prepared.stdout) != node
    done = runner.run(job2, "step_script", "test ! -e /var/tmp/gitlab-was-here; hostname")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() not in hostnames
    assert runner.call(job2, "cleanup").returncode == 0


def test_a_failing_script_is_a_build_failure_and_the_node_still_goes(runner: Runner) -> None:
    job = next(runner.job_ids)
    prepared = runner.call(job, "prepare")
    node = node_of(prepared.stdout)
    done = runner.run(job, "step_script", "echo before; false; echo never")
    assert done.returncode == BUILD_FAILURE, (done.stdout, done.stderr)
    assert "before" in done.stdout and "never" not in done.stdout
    # after_script still runs on the same node, as gitlab-runner runs it.
    assert runner.run(job, "after_script", "echo after").returncode == 0
    assert runner.call(job, "cleanup").returncode == 0
    wait_for(lambda: gone(runner.served, node), 60, f"node {node} destroyed")
    # A second cleanup (gitlab-runner retrying) finds nothing to do, and says ok.
    assert runner.call(job, "cleanup").returncode == 0


def test_what_freshpool_cannot_do_is_a_system_failure_that_names_why(runner: Runner) -> None:
    job = next(runner.job_ids)
    unknown = runner.call(job, "prepare", variables={"FRESHPOOL_LABELS": "no-such-label"})
    assert unknown.returncode == SYSTEM_FAILURE, unknown.stderr
    assert "no-such-label" in unknown.stderr, unknown.stderr
    # No node was taken for it, and run has none to use.
    assert runner.run(job, "step_script", "true").returncode == SYSTEM_FAILURE
    assert runner.call(job, "cleanup").returncode == 0

    # Not started by gitlab-runner: no job id.
    env = runner.env(job)
    del env["CUSTOM_ENV_CI_JOB_ID"]
    alone = runner.call(job, "prepare", env=env)
    assert alone.returncode == SYSTEM_FAILURE and "CUSTOM_ENV_CI_JOB_ID" in alone.stderr

    # A bad settings file: the line and key named, a system failure.
    runner.config.write_text(runner.config.read_text().replace("kill-grace: 1", "kill-grace: soon"))
    bad = runner.call(job, "config")
    assert bad.returncode == SYSTEM_FAILURE, bad.stderr
    assert "gitlab.yaml:6: kill-grace" in bad.stderr and "soon" in bad.stderr, bad.stderr


def test_a_cancelled_job_gets_term_then_kill_on_the_node(runner: Runner) -> None:
    job = next(runner.job_ids)
    node = node_of(runner.call(job, "prepare").stdout)

    # A script that traps TERM gets it, and its trap runs on the node.
    polite = runner.start_run(job, "step_script",
                              "trap 'echo got TERM; exit 0' TERM\necho started\n"
                              "sleep 300 & wait")  # fmt: skip
    assert polite.stdout is not None
    assert polite.stdout.readline().strip() == "started"
    polite.send_signal(signal.SIGTERM)
    out, _ = polite.communicate(timeout=60)
    assert "got TERM" in out
    assert polite.returncode == BUILD_FAILURE

    # One that ignores TERM, and its children, are killed after kill-grace (1 s here).
    stubborn = runner.start_run(job, "step_script",
                                "trap '' TERM\necho started\nsleep 300 & sleep 301")  # fmt: skip
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline().strip() == "started"
    began = time.monotonic()
    stubborn.send_signal(signal.SIGTERM)
    stubborn.communicate(timeout=60)
    assert stubborn.returncode == BUILD_FAILURE
    assert time.monotonic() - began < 30
    left = runner.run(job, "after_script", "pgrep -f 'sleep 30[01]' || echo none")
    assert left.stdout.strip() == "none", left.stdout

    assert runner.call(job, "cleanup").returncode == 0
    wait_for(lambda: gone(runner.served, node), 60, f"node {node} destroyed")
