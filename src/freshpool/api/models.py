"""The API's request and response bodies (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from freshpool.config import NAME_PATTERN
from freshpool.core.sshkeys import KEY_PATTERN, MAX_KEY_LENGTH, check_public_key
from freshpool.drivers.base import SshAccess
from freshpool.drivers.ssh import paste_command
from freshpool.store import BuildRow, EventRow, NodeRow, RequestRow

TenantName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["ci-main"])]


class In(BaseModel):
    # A misspelt field is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


def _a_number(value: Any) -> Any:
    # JSON Schema's numbers: 3 and 3.0 are fine, "3" and false are not (pydantic's lax
    # mode would take both, and a priority must never be compared as text).
    if isinstance(value, bool | str):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return value


Number = BeforeValidator(_a_number)
SshPublicKey = Annotated[
    str,
    AfterValidator(check_public_key),
    # The schema shows the pattern the check enforces; the check says what is wrong.
    Field(
        max_length=MAX_KEY_LENGTH,
        json_schema_extra={"pattern": KEY_PATTERN},
        examples=[
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIXvqDvadsx2yMWY0yG/vacNDvvRsvtv6EO4IlBi/syN"
        ],
    ),
]


class Problem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """An error: a message, or (422) a list of problems, each naming the field."""

    detail: str | list[Problem] | list[dict[str, Any]]


class Access(BaseModel):
    host: str
    port: int
    user: str
    key_path: str = Field(description="The pool's key for the node, on the server's host.")
    known_hosts_path: str
    host_keys: list[str] = Field(
        [], description="The node's SSH host public keys, for a remote client to pin."
    )
    public_host: str | None = Field(
        None,
        description="Where a client on another machine reaches the node's sshd"
        " (the provider's network.publish), with public_port; None if not published.",
    )
    public_port: int | None = None
    host_from_node: str | None = Field(
        None, description="The host's address as the node sees it (where network.host-ports are)."
    )
    strict_host_keys: bool = Field(
        True, description="False when the node's host key could not be pinned (emulated clouds)."
    )
    ssh: str = Field(description="A command a person can paste (on the server's host).")


class NodeOut(BaseModel):
    id: int
    label: str
    provider: str
    state: str
    hostname: str
    build: str
    request: int | None
    tenant: str
    reason: str
    created_at: float
    state_at: float
    ready_at: float | None
    external_id: str | None
    access: Access | None = Field(
        None, description="How to reach the node; shown only to the tenant it was handed to."
    )

    @classmethod
    def of(cls, node: NodeRow, show_access: bool) -> NodeOut:
        access = None
        if show_access and node.access:
            ssh = SshAccess(**node.access)
            access = Access(**ssh.as_dict(), ssh=paste_command(ssh))
        return cls(
            id=node.id,
            label=node.label,
            provider=node.provider,
            state=node.state,
            hostname=node.hostname,
            build=node.build_id,
            request=node.request_id,
            tenant=node.tenant,
            reason=node.reason,
            created_at=node.created_at,
            state_at=node.state_at,
            ready_at=node.ready_at,
            external_id=node.external_id,
            access=access,
        )


class EventOut(BaseModel):
    at: float
    from_state: str | None
    to_state: str | None
    reason: str

    @classmethod
    def of(cls, event: EventRow) -> EventOut:
        return cls(
            at=event.at, from_state=event.from_state, to_state=event.to_state, reason=event.reason
        )


class NodeDetail(NodeOut):
    job_started_at: float | None = Field(None, description="When POST /nodes/{id}/in-use came.")
    events: list[EventOut] = []


class JobStart(In):
    job: str = Field("", max_length=512, description="What runs, e.g. a CI build URL.")


class HoldIn(In):
    reason: str = Field("", max_length=512)


class RequestOut(BaseModel):
    id: int
    labels: list[str]
    requestor: str
    tenant: str
    priority: int
    state: str
    reason: str
    created_at: float
    state_at: float
    deadline: float | None
    provider: str | None
    fulfilled_at: float | None
    nodes: list[NodeOut] = []

    @classmethod
    def of(cls, request: RequestRow, nodes: list[NodeOut]) -> RequestOut:
        return cls(
            id=request.id,
            labels=list(request.labels),
            requestor=request.requestor,
            tenant=request.tenant,
            priority=request.priority,
            state=request.state,
            reason=request.reason,
            created_at=request.created_at,
            state_at=request.state_at,
            deadline=request.deadline,
            provider=request.provider,
            fulfilled_at=request.fulfilled_at,
            nodes=nodes,
        )


class AutoTargetOut(BaseModel):
    """A `min-ready: auto` label's settings and the target it was last given."""

    min: int
    max: int
    target_wait: float
    service_level: float
    target: int | None = Field(description="None until the launcher has chosen one.")
    target_at: float | None = None
    forecast_per_hour: float | None = Field(None, description="Requests per hour expected.")
    launch_time: float | None = Field(None, description="Seconds a launch was assumed to take.")
    why: str = ""


class LabelOut(BaseModel):
    name: str
    image: str
    min_ready: int = Field(description="Ready nodes kept: the fixed value, or auto's target.")
    auto: AutoTargetOut | None = None
    ready: int
    building: int = Field(description="Launching or being tested.")
    in_use: int
    hold: int
    deleting: int = Field(description="Used, failed or being deleted.")
    waiting: int = Field(description="Nodes pending requests still wait for.")


class BuildOut(BaseModel):
    id: str
    image: str
    state: str
    reason: str
    created_at: float
    state_at: float
    size_bytes: int | None
    nodes: int

    @classmethod
    def of(cls, build: BuildRow, nodes: int) -> BuildOut:
        size = (build.manifest or {}).get("size_bytes")
        return cls(
            id=build.id,
            image=build.image,
            state=build.state,
            reason=build.reason,
            created_at=build.created_at,
            state_at=build.state_at,
            size_bytes=size if isinstance(size, int) else None,
            nodes=nodes,
        )


class ImageOut(BaseModel):
    name: str
    serving: str | None = Field(description="The build new nodes launch from.")
    builds: list[BuildOut]


class ProviderOut(BaseModel):
    name: str
    driver: str
    max_nodes: int
    max_parallel_launches: int
    labels: list[str]
    nodes: int = Field(description="Nodes counted against max-nodes now.")
    by_state: dict[str, int]


class Health(BaseModel):
    ok: bool
    detail: str = ""


class QueueEntry(RequestOut):
    position: int


class LeaseOut(BaseModel):
    provider: str
    generation: int
    held_for: float = Field(description="Seconds since this launcher took the provider.")
    expires_in: float = Field(description="Seconds until the lease runs out unrenewed.")


class LauncherOut(BaseModel):
    """A launcher sharing the database (PostgreSQL), and the providers it drives."""

    id: str
    seen_ago: float = Field(description="Seconds since its last heartbeat.")
    live: bool = Field(description="Seen within one lease TTL; dead launchers hold no lease.")
    may_drive: list[str] | None
    leases: list[LeaseOut]


class Status(BaseModel):
    """Everything the dashboard shows, in one document."""

    now: float
    version: int
    ready: bool
    cluster: str
    labels: list[LabelOut]
    nodes: list[NodeOut]
    queue: list[QueueEntry]
    recent: list[RequestOut]
    builds: list[BuildOut]
    history: dict[str, Any]
    # Empty on SQLite, where the one launcher drives every provider.
    launchers: list[LauncherOut] = []
