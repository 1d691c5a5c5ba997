"""Image build rows and per-image switches: builds move by compare-and-set; newest ready serves."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from freshpool.core import states
from freshpool.core.errors import NotFound, Refused, StaleState
from freshpool.core.states import BuildState, UploadState
from freshpool.store.base import StoreBase, compare_and_set
from freshpool.store.schema import image_builds, images, nodes, uploads


class BuildInProgress(Refused):
    """An image already has a build that is not finished."""


@dataclass(frozen=True)
class BuildRow:
    id: str
    image: str
    state: str
    path: str
    reason: str
    manifest: dict[str, Any] | None
    created_at: float
    state_at: float
    digest: str = ""
    definition_key: str = ""
    parent_build: str | None = None
    layers: list[str] | None = None
    log_path: str = ""

    def layer_paths(self) -> tuple[Path, ...]:
        """The read-only layers a node of this build stacks, top first."""
        if self.layers:
            return tuple(Path(p) for p in self.layers)
        # Builds from before the layer pipeline are one tree in their own directory.
        return (Path(self.path) / "rootfs",)


@dataclass(frozen=True)
class ServingBuild:
    """The build new nodes of an image launch from on one provider."""

    build: BuildRow
    provider: str
    # What the provider calls its copy (ImageUpload's result).
    external_id: str | None


@dataclass(frozen=True)
class ImageRow:
    name: str
    paused: bool = False
    reason: str = ""
    updated_at: float = 0.0
    build_requested_at: float | None = None
    build_fresh: bool = False
    built_at: float | None = None


UNFINISHED = (BuildState.BUILDING, BuildState.VALIDATING)


class BuildQueries(StoreBase):
    def new_build(self, build_id: str, image: str, path: str, **values: Any) -> BuildRow:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                insert(image_builds).values(
                    id=build_id,
                    image=image,
                    state=BuildState.BUILDING,
                    path=path,
                    created_at=now,
                    state_at=now,
                    **values,
                )
            )
            return _build(conn, build_id)

    def start_build(
        self,
        image: str,
        images_dir: Path,
        definition_key: str,
        parent_build: str | None = None,
        reason: str = "",
    ) -> BuildRow:
        """A new numbered build row in `building`, unless the image has one unfinished."""
        now = time.time()
        with self._write() as conn:
            busy = conn.scalar(
                select(image_builds.c.id).where(
                    image_builds.c.image == image, image_builds.c.state.in_(UNFINISHED)
                )
            )
            if busy:
                raise BuildInProgress(f"image {image} already has build {busy} in progress")
            number = (
                conn.scalar(
                    select(func.count())
                    .select_from(image_builds)
                    .where(image_builds.c.image == image)
                )
                or 0
            )
            while True:
                number += 1
                build_id = f"{image}-{number:04d}"
                taken = conn.scalar(select(image_builds.c.id).where(image_builds.c.id == build_id))
                if not taken:
                    break
            path = images_dir / image / build_id
            conn.execute(
                insert(image_builds).values(
                    id=build_id,
                    image=image,
                    state=BuildState.BUILDING,
                    path=str(path),
                    reason=reason,
                    created_at=now,
                    state_at=now,
                    definition_key=definition_key,
                    parent_build=parent_build,
                    log_path=str(path / "build.log"),
                )
            )
            return _build(conn, build_id)

    def build(self, build_id: str) -> BuildRow:
        with self._read() as conn:
            row = conn.execute(select(image_builds).where(image_builds.c.id == build_id)).first()
        if row is None:
            raise NotFound(f"no image build {build_id!r} (see `freshpool image list`)")
        return BuildRow(**row._mapping)

    def build_transition(
        self,
        build_id: str,
        expect: BuildState,
        to: BuildState,
        reason: str = "",
        manifest: dict[str, Any] | None = None,
        **values: Any,
    ) -> BuildRow:
        states.check_build(expect, to)
        values.update(state=to, reason=reason, state_at=time.time())
        if manifest is not None:
            values["manifest"] = manifest
        with self._write() as conn:
            if not compare_and_set(conn, image_builds, build_id, expect, values):
                raise StaleState(f"image build {build_id} is not {expect}")
            return _build(conn, build_id)

    def record_layers(self, build_id: str, layers: Sequence[str], digest: str) -> None:
        """A building build's layer stack so far (top first), so nothing sweeps them."""
        with self._write() as conn:
            conn.execute(
                update(image_builds)
                .where(image_builds.c.id == build_id, image_builds.c.state == BuildState.BUILDING)
                .values(layers=list(layers), digest=digest)
            )

    def builds(
        self, image: str | None = None, states_in: Sequence[str] | None = None
    ) -> list[BuildRow]:
        """Builds, newest first."""
        query = select(image_builds).order_by(
            image_builds.c.created_at.desc(), image_builds.c.id.desc()
        )
        if image is not None:
            query = query.where(image_builds.c.image == image)
        if states_in is not None:
            query = query.where(image_builds.c.state.in_([str(s) for s in states_in]))
        with self._read() as conn:
            return [BuildRow(**row._mapping) for row in conn.execute(query)]

    def serving_build(self, image: str) -> BuildRow | None:
        """The newest ready build of an image."""
        query = (
            select(image_builds)
            .where(image_builds.c.image == image, image_builds.c.state == BuildState.READY)
            .order_by(image_builds.c.created_at.desc(), image_builds.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return BuildRow(**row._mapping) if row else None

    def serving_on(self, image: str, providers: Mapping[str, bool]) -> dict[str, ServingBuild]:
        """For each of `providers`, the newest ready build of an image whose upload to
        it is ready (providers with none are left out), in one query for them all.

        A provider's flag says its driver runs builds from their layers on disk, so
        a build with no upload row there yet serves too.
        """
        if not providers:
            return {}
        query = (
            select(image_builds, uploads.c.provider, uploads.c.state.label("upload_state"),
                   uploads.c.external_id.label("upload_external_id"))
            .outerjoin(uploads, (uploads.c.build_id == image_builds.c.id)
                       & uploads.c.provider.in_(sorted(providers)))
            .where(image_builds.c.image == image, image_builds.c.state == BuildState.READY)
            .order_by(image_builds.c.created_at.desc(), image_builds.c.id.desc())
        )  # fmt: skip
        with self._read() as conn:
            rows = conn.execute(query).all()
        builds: dict[str, BuildRow] = {}
        uploaded: dict[tuple[str, str], tuple[str, str | None]] = {}
        for row in rows:
            data = dict(row._mapping)
            provider, state = data.pop("provider"), data.pop("upload_state")
            external_id = data.pop("upload_external_id")
            builds.setdefault(data["id"], BuildRow(**data))
            if provider is not None:
                uploaded[data["id"], provider] = (state, external_id)
        found: dict[str, ServingBuild] = {}
        for provider, in_place in providers.items():
            for build in builds.values():  # newest first
                state, external_id = uploaded.get((build.id, provider), (None, None))
                if state == UploadState.READY or (in_place and state is None):
                    found[provider] = ServingBuild(build, provider, external_id)
                    break
        return found

    def nodes_per_build(self) -> Counter[str]:
        """How many node rows (any state) each build has."""
        query = select(nodes.c.build_id, func.count()).group_by(nodes.c.build_id)
        with self._read() as conn:
            return Counter({build_id: n for build_id, n in conn.execute(query)})

    # ------------------------------------------------------------ per-image switches

    def image_row(self, name: str) -> ImageRow:
        with self._read() as conn:
            row = conn.execute(select(images).where(images.c.name == name)).first()
        return ImageRow(**row._mapping) if row else ImageRow(name)

    def set_paused(self, name: str, paused: bool, reason: str = "") -> ImageRow:
        with self._write() as conn:
            _upsert_image(conn, name, paused=paused, reason=reason)
            return _image(conn, name)

    def request_build(self, name: str, fresh: bool = False) -> ImageRow:
        """Ask the running launcher to build `name` at its next pass."""
        with self._write() as conn:
            _upsert_image(conn, name, build_requested_at=time.time(), build_fresh=fresh)
            return _image(conn, name)

    def take_build_request(self, name: str) -> bool | None:
        """Clear a pending build request; return whether it asked for a fresh build."""
        with self._write() as conn:
            row = conn.execute(select(images).where(images.c.name == name)).first()
            if row is None or row.build_requested_at is None:
                return None
            conn.execute(
                update(images)
                .where(images.c.name == name)
                .values(build_requested_at=None, build_fresh=False, updated_at=time.time())
            )
            return bool(row.build_fresh)

    def set_built_at(self, name: str, at: float) -> None:
        with self._write() as conn:
            _upsert_image(conn, name, built_at=at)


def _upsert_image(conn: Connection, name: str, **values: Any) -> None:
    now = time.time()
    changed = conn.execute(
        update(images).where(images.c.name == name).values(updated_at=now, **values)
    ).rowcount
    if changed == 0:
        conn.execute(insert(images).values(name=name, updated_at=now, **values))


def _image(conn: Connection, name: str) -> ImageRow:
    return ImageRow(**conn.execute(select(images).where(images.c.name == name)).one()._mapping)


def _build(conn: Connection, build_id: str) -> BuildRow:
    return BuildRow(
        **conn.execute(select(image_builds).where(image_builds.c.id == build_id)).one()._mapping
    )
