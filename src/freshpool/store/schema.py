"""The store's tables. Times are seconds since the epoch (UTC) as floats."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    # AUTOINCREMENT: ids are never reused, so a stray instance tagged with an old id
    # can never be mistaken for a newer node.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("build_id", String(128), nullable=False, server_default=""),
    Column("hostname", String(128), nullable=False),
    Column("external_id", String(256)),
    Column("access", JSON),
    Column("request_id", Integer),
    Column("reason", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("state_at", Float, nullable=False),
    Column("ready_at", Float),
    Column("delete_attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False, server_default="0"),
    # The tenant of the request the node was handed to (token scoping, fair share).
    Column("tenant", String(64), nullable=False, server_default=""),
    # Last time a health check of a ready node passed.
    Column("checked_at", Float),
    sqlite_autoincrement=True,
)
Index("ix_nodes_state_label", nodes.c.state, nodes.c.label, nodes.c.provider)
Index("ix_nodes_request", nodes.c.request_id)

requests = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("labels", JSON, nullable=False),
    Column("requestor", String(256), nullable=False, server_default=""),
    Column("tenant", String(64), nullable=False, server_default=""),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("state_at", Float, nullable=False),
    Column("deadline", Float),
    Column("provider", String(64)),
    Column("fulfilled_at", Float),
    # The job's SSH public keys, for its nodes' authorized_keys (None: none given).
    Column("ssh_keys", JSON),
    sqlite_autoincrement=True,
)
Index("ix_requests_state", requests.c.state, requests.c.created_at)

image_builds = Table(
    "image_builds",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("image", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("path", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("manifest", JSON),
    Column("created_at", Float, nullable=False),
    Column("state_at", Float, nullable=False),
    # Content digest of the build's top layer, and the hash of the definition it was
    # built from (a changed definition means a rebuild).
    Column("digest", String(80), nullable=False, server_default=""),
    Column("definition_key", String(80), nullable=False, server_default=""),
    Column("parent_build", String(128)),
    # Layer directories, top first, as the local driver stacks them.
    Column("layers", JSON),
    Column("log_path", Text, nullable=False, server_default=""),
)
Index("ix_image_builds_image", image_builds.c.image, image_builds.c.state)

# Per-image operator switches (pause, build requests) and rebuild bookkeeping.
images = Table(
    "images",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("paused", Boolean, nullable=False, server_default="0"),
    Column("reason", Text, nullable=False, server_default=""),
    Column("updated_at", Float, nullable=False),
    # `image build` asked the running launcher for a build (and whether to ignore caches).
    Column("build_requested_at", Float),
    Column("build_fresh", Boolean, nullable=False, server_default="0"),
    # When the newest build that passed validation was made; rebuild-age counts from
    # here, so a rollback does not make the image look due for a rebuild.
    Column("built_at", Float),
)

# Where each build has been uploaded (cloud drivers); the local driver uses layers in place.
uploads = Table(
    "uploads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("build_id", String(128), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("external_id", String(256)),
    Column("reason", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("state_at", Float, nullable=False),
    UniqueConstraint("build_id", "provider", name="uq_uploads_build_provider"),
    sqlite_autoincrement=True,
)

# API bearer tokens: only a hash is stored; each is bound to one tenant.
tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("digest", String(128), nullable=False, unique=True),
    Column("description", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked", Boolean, nullable=False, server_default="0"),
    sqlite_autoincrement=True,
)

# History outlives the node rows, so it holds plain ids, not foreign keys.
node_events = Table(
    "node_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("reason", Text, nullable=False, server_default=""),
    # What the node was when the event happened, kept here because the node's row goes
    # when it is deleted and cost accounting needs them after: the tenant is the one
    # the node was handed to ("" before a hand-out). NULL in events older than 0005.
    Column("label", String(64)),
    Column("provider", String(64)),
    Column("tenant", String(64)),
    # The launcher whose fenced write this was and the lease generation it held on the
    # node's provider (store/fencing.py), so the history shows who drove the provider;
    # NULL for writes that are not fenced (hand-outs, releases) and before 0009.
    Column("launcher", String(256)),
    Column("generation", Integer),
)
Index("ix_node_events_node", node_events.c.node_id, node_events.c.at)
# Usage reads a window of history by time.
Index("ix_node_events_at", node_events.c.at)

# Every change of a `min-ready: auto` label's warm-pool target, with what it was
# chosen from (core/demand.py), so `labels --why` and the dashboard can explain it.
label_targets = Table(
    "label_targets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("target", Integer, nullable=False),
    Column("previous", Integer),
    # The forecast rate, requests per second, and the launch time assumed, seconds.
    Column("rate", Float, nullable=False),
    Column("launch_time", Float, nullable=False),
    Column("why", Text, nullable=False, server_default=""),
    sqlite_autoincrement=True,
)
Index("ix_label_targets_label", label_targets.c.label, label_targets.c.at)

# Launchers sharing this database (PostgreSQL), each with its heartbeat: the live
# ones are those seen within a lease's TTL, and providers are spread over them.
launchers = Table(
    "launchers",
    metadata,
    Column("id", String(256), primary_key=True),
    # The providers it may drive (None: every one it has configured).
    Column("providers", JSON),
    Column("started_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
)

# Which launcher drives each provider. A row is never deleted, so `generation` only
# grows: it goes up each time the provider changes hands, and a launcher's writes for
# the provider check it in their own transaction (the fence).
provider_leases = Table(
    "provider_leases",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("owner", String(256), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("taken_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
)

# Every time a launcher took a provider's lease (a takeover, a take after a release, or
# a restarted launcher taking back its own): who drove each provider when, for the
# fleet's chaos checks and an operator's questions.
lease_takes = Table(
    "lease_takes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("provider", String(64), nullable=False),
    Column("owner", String(256), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("at", Float, nullable=False),
    # Who held it before ("" for the first take).
    Column("previous", String(256), nullable=False),
)
