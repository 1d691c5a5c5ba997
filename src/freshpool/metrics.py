"""The metric objects every part of freshpool updates, mirrored to statsd when configured.

Prometheus reads them from /metrics (the default registry). Code that sees something
happen calls the small functions below rather than the objects, so one call feeds
both Prometheus and statsd. Node counts by state are not kept here: they are read
from the store when scraped (see freshpool.api.metrics).
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram
from statsd import StatsClient

from freshpool.config import Statsd

log = logging.getLogger("freshpool.metrics")

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
# Request wait spans a warm hand-out (milliseconds) to a cold launch (minutes).
_WAIT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

LAUNCH_SECONDS = Histogram(
    "freshpool_launch_duration_seconds",
    "From launch to the instance being up, per node.",
    ["provider", "label"],
    buckets=_SECONDS,
)
TEST_SECONDS = Histogram(
    "freshpool_test_duration_seconds",
    "From the instance being up to the node passing (or failing) its test.",
    ["provider", "label"],
    buckets=_SECONDS,
)
DELETE_SECONDS = Histogram(
    "freshpool_delete_duration_seconds",
    "From a node entering deleting to its instance confirmed gone.",
    ["provider"],
    buckets=_SECONDS,
)
REQUEST_WAIT_SECONDS = Histogram(
    "freshpool_request_wait_seconds",
    "From a request being made to its node set being handed over.",
    ["tenant"],
    buckets=_WAIT,
)
FAILURES = Counter(
    "freshpool_failures",
    "Failures by cause: launch, test, health, job, vanished, delete, deadline.",
    ["cause"],
)
LEAKED_INSTANCES = Counter(
    "freshpool_leaked_instances",
    "Instances carrying this cluster's tags that the store did not know.",
)
NODE_SECONDS = Counter(
    "freshpool_node_seconds",
    "Seconds nodes spent in each state, by the tenant they were handed to ('' before).",
    ["tenant", "label", "provider", "state"],
)
LAUNCHES = Counter("freshpool_launches", "Nodes launched.", ["provider", "label"])
REQUESTS = Counter("freshpool_requests", "Requests finished, by outcome.", ["outcome"])
CONTROLLER_SECONDS = Histogram(
    "freshpool_launcher_pass_seconds",
    "One launcher pass of one controller (nodes, upkeep, leaks, images, metrics).",
    ["controller"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CONTROLLER_ERRORS = Counter(
    "freshpool_launcher_errors",
    "Exceptions a launcher controller raised (it sits out a backoff, serve goes on).",
    ["controller"],
)
READY_TARGET = Gauge(
    "freshpool_ready_target",
    "A min-ready: auto label's warm-pool target, as the demand controller last chose it.",
    ["label"],
)

_statsd: StatsClient | None = None
_lock = threading.Lock()


def use_statsd(settings: Statsd | None) -> None:
    """Mirror every metric to a statsd server (None: stop mirroring)."""
    global _statsd
    with _lock:
        _statsd = (
            StatsClient(settings.host, settings.port, prefix=settings.prefix) if settings else None
        )
    if settings:
        log.info("metrics: mirroring to statsd at %s:%d", settings.host, settings.port)


def _timing(name: str, seconds: float) -> None:
    client = _statsd
    if client is not None:
        client.timing(name, seconds * 1000)


def _incr(name: str, count: int = 1) -> None:
    client = _statsd
    if client is not None:
        client.incr(name, count)


def launched(provider: str, label: str) -> None:
    LAUNCHES.labels(provider, label).inc()
    _incr(f"launches.{provider}.{label}")


def launch_done(provider: str, label: str, seconds: float) -> None:
    LAUNCH_SECONDS.labels(provider, label).observe(seconds)
    _timing(f"launch.{provider}.{label}", seconds)


def test_done(provider: str, label: str, seconds: float) -> None:
    TEST_SECONDS.labels(provider, label).observe(seconds)
    _timing(f"test.{provider}.{label}", seconds)


def delete_done(provider: str, seconds: float) -> None:
    DELETE_SECONDS.labels(provider).observe(seconds)
    _timing(f"delete.{provider}", seconds)


def request_done(tenant: str, outcome: str, wait: float | None) -> None:
    REQUESTS.labels(outcome).inc()
    _incr(f"requests.{outcome}")
    if wait is not None:
        REQUEST_WAIT_SECONDS.labels(tenant).observe(wait)
        _timing(f"request_wait.{tenant or 'none'}", wait)


def node_seconds(tenant: str, label: str, provider: str, state: str, seconds: float) -> None:
    if seconds > 0:
        NODE_SECONDS.labels(tenant, label, provider, state).inc(seconds)


def controller_pass(name: str, seconds: float) -> None:
    CONTROLLER_SECONDS.labels(name).observe(seconds)


def controller_error(name: str) -> None:
    CONTROLLER_ERRORS.labels(name).inc()
    _incr(f"launcher_errors.{name}")


def failure(cause: str) -> None:
    FAILURES.labels(cause).inc()
    _incr(f"failures.{cause}")


def ready_target(label: str, target: int) -> None:
    READY_TARGET.labels(label).set(target)
    client = _statsd
    if client is not None:
        client.gauge(f"ready_target.{label}", target)


def leaked(count: int = 1) -> None:
    LEAKED_INSTANCES.inc(count)
    _incr("leaked_instances", count)


_gauged: set[tuple[str, str, str]] = set()


def node_gauges(counts: dict[tuple[str, str, str], int]) -> None:
    """Send node counts by (provider, label, state) as statsd gauges (Prometheus scrapes them)."""
    global _gauged
    client = _statsd
    if client is None:
        return
    pipe = client.pipeline()
    # A state that emptied must read 0, not keep its last value.
    for key in sorted(_gauged | set(counts)):
        provider, label, state = key
        pipe.gauge(f"nodes.{provider}.{label}.{state}", counts.get(key, 0))
    pipe.send()
    _gauged = {key for key, n in counts.items() if n}
