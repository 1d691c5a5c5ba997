"""Upload rows: where each image build has been made available, moved by compare-and-set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from freshpool.core import states
from freshpool.core.errors import StaleState
from freshpool.core.states import UploadState
from freshpool.store.base import StoreBase, compare_and_set
from freshpool.store.schema import uploads


@dataclass(frozen=True)
class UploadRow:
    id: int
    build_id: str
    provider: str
    state: str
    external_id: str | None
    reason: str
    created_at: float
    state_at: float


class UploadQueries(StoreBase):
    def new_upload(self, build_id: str, provider: str) -> UploadRow:
        now = time.time()
        with self._write() as conn:
            key = conn.execute(
                insert(uploads).values(
                    build_id=build_id,
                    provider=provider,
                    state=UploadState.UPLOADING,
                    created_at=now,
                    state_at=now,
                )
            ).inserted_primary_key
            assert key is not None
            upload_id = key[0]
            return _upload(conn, upload_id)

    def upload_transition(
        self,
        upload_id: int,
        expect: UploadState,
        to: UploadState,
        reason: str = "",
        **values: Any,
    ) -> UploadRow:
        states.check_upload(expect, to)
        values.update(state=to, reason=reason, state_at=time.time())
        with self._write() as conn:
            if not compare_and_set(conn, uploads, upload_id, expect, values):
                raise StaleState(f"image upload {upload_id} is not {expect}")
            return _upload(conn, upload_id)

    def uploads(
        self,
        build_id: str | None = None,
        provider: str | None = None,
        states_in: Sequence[str] | None = None,
    ) -> list[UploadRow]:
        query = select(uploads).order_by(uploads.c.id)
        if build_id is not None:
            query = query.where(uploads.c.build_id == build_id)
        if provider is not None:
            query = query.where(uploads.c.provider == provider)
        if states_in is not None:
            query = query.where(uploads.c.state.in_([str(s) for s in states_in]))
        with self._read() as conn:
            return [UploadRow(**row._mapping) for row in conn.execute(query)]

    def remove_upload(self, upload_id: int) -> None:
        """Forget an upload the provider confirmed deleted (only from `deleting`)."""
        with self._write() as conn:
            gone = conn.execute(
                delete(uploads).where(
                    uploads.c.id == upload_id, uploads.c.state == UploadState.DELETING
                )
            ).rowcount
            if gone != 1:
                raise StaleState(f"image upload {upload_id} is not deleting")


def _upload(conn: Connection, upload_id: int) -> UploadRow:
    return UploadRow(
        **conn.execute(select(uploads).where(uploads.c.id == upload_id)).one()._mapping
    )
