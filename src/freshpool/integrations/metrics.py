"""What each integration counts, labelled by integration (buildbot, github, gitlab);
exported by whichever process runs the integration, from the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# From a CI job being queued to its first step running: a warm hand-out (a second)
# to a cold launch (minutes).
_QUEUED = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

JOBS = Counter(
    "freshpool_integration_jobs",
    "CI jobs whose agent ran on a freshpool node, by result (passed, failed, error).",
    ["integration", "result"],
)
QUEUED_TO_RUNNING = Histogram(
    "freshpool_integration_queued_to_running_seconds",
    "From a CI job being queued to its agent running on a node.",
    ["integration"],
    buckets=_QUEUED,
)
AGENT_START_FAILURES = Counter(
    "freshpool_integration_agent_start_failures",
    "Agents that did not start or never connected to their CI server (node replaced).",
    ["integration"],
)
ORPHANS_REMOVED = Counter(
    "freshpool_integration_orphans_removed",
    "CI-side registrations (runner, agent, worker) found without a node and removed.",
    ["integration"],
)
CI_SERVER_ERRORS = Counter(
    "freshpool_integration_ci_server_errors",
    "Calls to a CI server that failed (down, 5xx, rate-limited) and were retried.",
    ["integration"],
)
