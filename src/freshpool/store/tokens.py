"""API token rows: only a digest of each token is stored, bound to one tenant."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from freshpool.core.errors import NotFound
from freshpool.store.base import StoreBase
from freshpool.store.schema import tokens


@dataclass(frozen=True)
class TokenRow:
    id: int
    tenant: str
    digest: str
    description: str
    created_at: float
    last_used_at: float | None
    revoked: bool


class TokenQueries(StoreBase):
    def new_token(self, tenant: str, digest: str, description: str = "") -> TokenRow:
        with self._write() as conn:
            key = conn.execute(
                insert(tokens).values(
                    tenant=tenant, digest=digest, description=description, created_at=time.time()
                )
            ).inserted_primary_key
            assert key is not None
            token_id = key[0]
            return _token(conn, token_id)

    def token_by_digest(self, digest: str) -> TokenRow | None:
        """The token with this digest, revoked or not (the caller decides)."""
        with self._read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.digest == digest)).first()
        return TokenRow(**row._mapping) if row else None

    def tokens(self) -> list[TokenRow]:
        with self._read() as conn:
            return [
                TokenRow(**row._mapping)
                for row in conn.execute(select(tokens).order_by(tokens.c.id))
            ]

    def revoke_token(self, token_id: int) -> TokenRow:
        with self._write() as conn:
            if (
                conn.execute(
                    update(tokens).where(tokens.c.id == token_id).values(revoked=True)
                ).rowcount
                != 1
            ):
                raise NotFound(f"no token {token_id}")
            return _token(conn, token_id)

    def touch_token(self, token_id: int, at: float) -> None:
        with self._write() as conn:
            conn.execute(update(tokens).where(tokens.c.id == token_id).values(last_used_at=at))


def _token(conn: Connection, token_id: int) -> TokenRow:
    row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
    if row is None:
        raise NotFound(f"no token {token_id}")
    return TokenRow(**row._mapping)
