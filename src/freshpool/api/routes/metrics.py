"""/metrics: what the launcher's observer published (observed.py), plus node and request
counts read from the store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.api.services import Services
from freshpool.core.states import NodeState

router = APIRouter(tags=["health"], route_class=QueryCheckedRoute)


class PoolCollector(Collector):
    """Counts from the store at scrape time, so they are right whichever process changed them."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily(
            "freshpool_nodes",
            "Nodes by state, label and provider.",
            labels=["state", "label", "provider"],
        )
        counts = self.svc.store.node_counts()
        # Every configured combination is present, at 0 when empty, so graphs and
        # alerts see an emptied state instead of a vanished series.
        keys = {
            (p.name, label.name, str(state))
            for p in self.svc.config.providers
            for label in self.svc.config.labels
            if p.serves(label.name)
            for state in NodeState
        } | set(counts)
        for provider, label, state in sorted(keys):
            nodes.add_metric([state, label, provider], counts.get((provider, label, state), 0))
        yield nodes
        pending = GaugeMetricFamily(
            "freshpool_requests_pending", "Requests waiting, by tenant.", labels=["tenant"]
        )
        for tenant, n in sorted(self.svc.store.pending_by_tenant().items()):
            pending.add_metric([tenant], n)
        yield pending
        ready = GaugeMetricFamily(
            "freshpool_ready", "1 once the launcher has reconciled every provider."
        )
        ready.add_metric([], 1 if self.svc.scheduler.started.is_set() else 0)
        yield ready


def registry_for(svc: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(svc))
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
def scrape(request: Request) -> Response:
    svc: Services = request.app.state.services
    body = svc.observed.read().metrics + generate_latest(request.app.state.pool_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
