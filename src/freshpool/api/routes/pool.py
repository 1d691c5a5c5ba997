"""/labels, /images, /builds, /providers, /healthz and /ready: the pool as it stands."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from fastapi import APIRouter, Response, status

from freshpool.api.auth import Reader, Svc
from freshpool.api.models import (
    AutoTargetOut,
    BuildOut,
    ErrorOut,
    Health,
    ImageOut,
    LabelOut,
    ProviderOut,
)
from freshpool.api.routes.querycheck import QueryCheckedRoute
from freshpool.api.services import Services
from freshpool.config import Label
from freshpool.core.states import NodeState
from freshpool.store import TargetRow

N = NodeState
router = APIRouter(
    route_class=QueryCheckedRoute,
    tags=["pool"],
    responses={401: {"model": ErrorOut, "description": "Status is closed: send a token."}},
)


def _states_by(svc: Services, key: Callable[[str, str], str]) -> dict[str, Counter[str]]:
    """Node counts by state, grouped by key(provider, label), from one grouped query."""
    grouped: dict[str, Counter[str]] = {}
    for (provider, label, state), n in svc.store.node_counts().items():
        grouped.setdefault(key(provider, label), Counter())[state] += n
    return grouped


def label_summaries(svc: Services) -> list[LabelOut]:
    by_label = _states_by(svc, lambda provider, label: label)
    waiting = svc.store.pending_demand()
    targets = svc.store.latest_targets()
    out = []
    for label in svc.config.labels:
        c = by_label.get(label.name, Counter())
        auto = _auto_of(label, targets.get(label.name))
        out.append(
            LabelOut(
                name=label.name,
                image=label.image,
                min_ready=label.ready_floor if auto is None else auto.target or auto.min,
                auto=auto,
                ready=c[N.READY],
                building=c[N.BUILDING] + c[N.TESTING],
                in_use=c[N.IN_USE],
                hold=c[N.HOLD],
                deleting=c[N.USED] + c[N.FAILED] + c[N.DELETING],
                waiting=waiting.get(label.name, 0),
            )
        )
    return out


def _auto_of(label: Label, row: TargetRow | None) -> AutoTargetOut | None:
    settings = label.auto
    if settings is None:
        return None
    return AutoTargetOut(
        min=settings.min,
        max=settings.max,
        target_wait=settings.target_wait,
        service_level=settings.service_level,
        target=row.target if row else None,
        target_at=row.at if row else None,
        forecast_per_hour=row.rate * 3600 if row else None,
        launch_time=row.launch_time if row else None,
        why=row.why if row else "no target chosen yet: the launcher keeps min",
    )


def build_list(svc: Services, limit: int | None = None) -> list[BuildOut]:
    using = Counter(n.build_id for n in svc.store.nodes())
    builds = svc.store.builds()
    if limit is not None:
        builds = builds[:limit]
    return [BuildOut.of(b, using.get(b.id, 0)) for b in builds]


@router.get("/labels", summary="Each label: min-ready, ready, building, in use, waiting")
def labels(svc: Svc, _who: Reader) -> list[LabelOut]:
    return label_summaries(svc)


@router.get("/builds", summary="Image builds, newest first")
def builds(svc: Svc, _who: Reader) -> list[BuildOut]:
    return build_list(svc)


@router.get("/images", summary="Each configured image, the build it serves, and its builds")
def images(svc: Svc, _who: Reader) -> list[ImageOut]:
    every = build_list(svc)
    out = []
    for image in svc.config.images:
        serving = svc.store.serving_build(image.name)
        out.append(
            ImageOut(
                name=image.name,
                serving=serving.id if serving else None,
                builds=[b for b in every if b.image == image.name],
            )
        )
    return out


@router.get("/providers", summary="Each provider: limits and nodes by state")
def providers(svc: Svc, _who: Reader) -> list[ProviderOut]:
    by_provider = _states_by(svc, lambda provider, label: provider)
    out = []
    for p in svc.config.providers:
        c = by_provider.get(p.name, Counter())
        out.append(
            ProviderOut(
                name=p.name,
                driver=p.driver,
                max_nodes=p.max_nodes,
                max_parallel_launches=p.max_parallel_launches,
                labels=[x.name for x in svc.config.labels if p.serves(x.name)],
                nodes=sum(c.values()),
                by_state=dict(c),
            )
        )
    return out


@router.get("/healthz", summary="The server answers", tags=["health"])
def healthz() -> Health:
    return Health(ok=True)


@router.get(
    "/ready",
    summary="200 once the launcher has reconciled every provider once, else 503",
    tags=["health"],
    responses={503: {"model": Health, "description": "Not reconciled yet."}},
)
def ready(svc: Svc, response: Response) -> Health:
    if svc.scheduler.started.is_set():
        return Health(ok=True, detail="every provider reconciled")
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(ok=False, detail="the launcher has not finished its first pass")
