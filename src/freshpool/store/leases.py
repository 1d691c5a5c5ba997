"""Launcher heartbeats and provider leases (several launchers on one PostgreSQL).

Times are the database server's clock on PostgreSQL, so launchers on hosts whose
clocks disagree still agree on when a lease expires.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from freshpool.store.base import StoreBase
from freshpool.store.schema import launchers, lease_takes, provider_leases


@dataclass(frozen=True)
class LauncherRow:
    id: str
    providers: list[str] | None
    started_at: float
    seen_at: float


@dataclass(frozen=True)
class LeaseRow:
    provider: str
    owner: str
    generation: int
    expires_at: float
    taken_at: float
    renewed_at: float


def db_now(conn: Connection) -> float:
    """Seconds since the epoch by the database's clock (this host's for SQLite)."""
    if conn.dialect.name == "postgresql":
        return float(conn.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
    return time.time()


class LeaseQueries(StoreBase):
    def heartbeat(
        self, launcher: str, providers: Collection[str] | None, forget_after: float | None = None
    ) -> float:
        """Say `launcher` is alive (and which providers it may drive); returns the
        database's time. With `forget_after`, launchers not seen for that many
        seconds are removed: one killed never says it leaves, and the live ones are
        the ones left to clear its row."""
        serves = sorted(providers) if providers is not None else None
        with self._write() as conn:
            now = db_now(conn)
            if forget_after is not None:
                conn.execute(delete(launchers).where(launchers.c.seen_at < now - forget_after))
            changed = conn.execute(
                update(launchers)
                .where(launchers.c.id == launcher)
                .values(seen_at=now, providers=serves)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(launchers).values(
                        id=launcher, providers=serves, started_at=now, seen_at=now
                    )
                )
        return now

    def leave(self, launcher: str) -> None:
        """`launcher` stops: forget it, and let its leases go at once."""
        with self._write() as conn:
            conn.execute(delete(launchers).where(launchers.c.id == launcher))
            conn.execute(
                update(provider_leases)
                .where(provider_leases.c.owner == launcher)
                .values(expires_at=0.0)
            )

    def live_launchers(self, ttl: float) -> list[LauncherRow]:
        """Launchers seen within `ttl` seconds, by id."""
        with self._read() as conn:
            since = db_now(conn) - ttl
            query = select(launchers).where(launchers.c.seen_at >= since).order_by(launchers.c.id)
            return [LauncherRow(**row._mapping) for row in conn.execute(query)]

    def launcher_rows(self) -> list[LauncherRow]:
        with self._read() as conn:
            query = select(launchers).order_by(launchers.c.id)
            return [LauncherRow(**row._mapping) for row in conn.execute(query)]

    def fleet_now(self) -> float:
        """The time leases and heartbeats are written in (the database's clock)."""
        with self._read() as conn:
            return db_now(conn)

    def leases(self) -> dict[str, LeaseRow]:
        with self._read() as conn:
            rows = conn.execute(select(provider_leases).order_by(provider_leases.c.provider))
            return {row.provider: LeaseRow(**row._mapping) for row in rows}

    def take_lease(self, provider: str, owner: str, ttl: float) -> int | None:
        """Take `provider`'s lease for `owner` if it is free, expired or `owner`'s
        already; the generation `owner` now holds it at, or None (another holds it)."""
        try:
            with self._write() as conn:
                now = db_now(conn)
                row = conn.execute(
                    select(provider_leases)
                    .where(provider_leases.c.provider == provider)
                    .with_for_update()
                ).first()
                if row is None:
                    conn.execute(
                        insert(provider_leases).values(
                            provider=provider,
                            owner=owner,
                            generation=1,
                            expires_at=now + ttl,
                            taken_at=now,
                            renewed_at=now,
                        )
                    )
                    _taken(conn, provider, owner, 1, now, "")
                    return 1
                if row.owner != owner and row.expires_at > now:
                    return None
                # Our own unexpired lease keeps its generation; anything else (another's
                # lease that ran out, or our own after a release) is a new one.
                mine = row.owner == owner and row.expires_at > now
                generation = int(row.generation) + (0 if mine else 1)
                conn.execute(
                    update(provider_leases)
                    .where(provider_leases.c.provider == provider)
                    .values(
                        owner=owner,
                        generation=generation,
                        expires_at=now + ttl,
                        taken_at=row.taken_at if mine else now,
                        renewed_at=now,
                    )
                )
                _taken(conn, provider, owner, generation, now, row.owner)
                return generation
        except IntegrityError:  # another launcher inserted the first row meanwhile
            return None

    def lease_history(self) -> list[tuple[str, str, int, float, str]]:
        """Every take, oldest first: (provider, owner, generation, at, previous owner)."""
        with self._read() as conn:
            query = select(
                lease_takes.c.provider,
                lease_takes.c.owner,
                lease_takes.c.generation,
                lease_takes.c.at,
                lease_takes.c.previous,
            ).order_by(lease_takes.c.id)
            return [(p, o, g, at, before) for p, o, g, at, before in conn.execute(query)]

    def renew_leases(self, owner: str, held: dict[str, int], ttl: float) -> set[str]:
        """Extend each lease `owner` holds at the generation given; the providers it
        still holds (a missing one was taken over)."""
        kept: set[str] = set()
        with self._write() as conn:
            now = db_now(conn)
            for provider in sorted(held):
                changed = conn.execute(
                    update(provider_leases)
                    .where(
                        provider_leases.c.provider == provider,
                        provider_leases.c.owner == owner,
                        provider_leases.c.generation == held[provider],
                    )
                    .values(expires_at=now + ttl, renewed_at=now)
                ).rowcount
                if changed:
                    kept.add(provider)
        return kept

    def release_lease(self, provider: str, owner: str, generation: int) -> None:
        """Give the lease up now (the next taker starts a new generation)."""
        with self._write() as conn:
            conn.execute(
                update(provider_leases)
                .where(
                    provider_leases.c.provider == provider,
                    provider_leases.c.owner == owner,
                    provider_leases.c.generation == generation,
                )
                .values(expires_at=0.0)
            )


def _taken(
    conn: Connection, provider: str, owner: str, generation: int, at: float, previous: str
) -> None:
    conn.execute(
        insert(lease_takes).values(
            provider=provider, owner=owner, generation=generation, at=at, previous=previous
        )
    )
