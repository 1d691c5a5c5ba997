"""Image build rows: created building, moved by compare-and-set, newest ready serves."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from freshpool import states
from freshpool.states import BuildState
from freshpool.store.base import StaleState, StoreBase
from freshpool.store.schema import image_builds


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


class BuildQueries(StoreBase):
    def new_build(self, build_id: str, image: str, path: str) -> BuildRow:
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
                )
            )
            return _build(conn, build_id)

    def build_transition(
        self,
        build_id: str,
        expect: BuildState,
        to: BuildState,
        reason: str = "",
        manifest: dict[str, Any] | None = None,
    ) -> BuildRow:
        states.check_build(expect, to)
        values: dict[str, Any] = {"state": to, "reason": reason, "state_at": time.time()}
        if manifest is not None:
            values["manifest"] = manifest
        with self._write() as conn:
            changed = conn.execute(
                update(image_builds)
                .where(image_builds.c.id == build_id, image_builds.c.state == expect)
                .values(**values)
            ).rowcount
            if changed != 1:
                raise StaleState(f"image build {build_id} is not {expect}")
            return _build(conn, build_id)

    def builds(self, image: str | None = None) -> list[BuildRow]:
        query = select(image_builds).order_by(image_builds.c.created_at.desc())
        if image is not None:
            query = query.where(image_builds.c.image == image)
        with self._read() as conn:
            return [BuildRow(**row._mapping) for row in conn.execute(query)]

    def serving_build(self, image: str) -> BuildRow | None:
        """The newest ready build of an image: the one new nodes launch from."""
        query = (
            select(image_builds)
            .where(image_builds.c.image == image, image_builds.c.state == BuildState.READY)
            .order_by(image_builds.c.created_at.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return BuildRow(**row._mapping) if row else None


def _build(conn: Connection, build_id: str) -> BuildRow:
    return BuildRow(
        **conn.execute(select(image_builds).where(image_builds.c.id == build_id)).one()._mapping
    )
