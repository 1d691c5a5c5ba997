"""API bearer tokens: made from `secrets`, stored as a SHA-256 digest, checked per call."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time

from freshpool.config import NAME_PATTERN
from freshpool.core.errors import BadInput
from freshpool.store import Store, TokenRow

PREFIX = "fp_"
# Recording last use costs a write; once a minute per token is enough to see which are idle.
TOUCH_EVERY = 60.0


class BadTenant(BadInput):
    pass


def digest(secret: str) -> str:
    # The secret carries 256 random bits, so a fast hash is safe here (no guessing a
    # password); it also keeps checking a token cheap on every API call.
    return hashlib.sha256(secret.encode()).hexdigest()


def create(store: Store, tenant: str, description: str = "") -> tuple[TokenRow, str]:
    """A new token for `tenant`: the row, and the secret (shown once, never stored)."""
    if not re.fullmatch(NAME_PATTERN, tenant):
        raise BadTenant(
            f"tenant {tenant!r}: use 1-31 lower-case letters, digits and dashes, like 'ci-main'"
        )
    secret = PREFIX + secrets.token_urlsafe(32)
    return store.new_token(tenant, digest(secret), description), secret


class TokenChecker:
    """Finds the live token for a secret; remembers when each was last used (throttled).

    Answers are kept for `remember` seconds, so a busy client costs no query per call;
    a revoked token is therefore refused at most that long after `token revoke`.
    """

    def __init__(self, store: Store, remember: float = 2.0) -> None:
        self.store = store
        self.remember = remember
        self._touched: dict[int, float] = {}
        self._known: dict[str, tuple[float, TokenRow | None]] = {}
        self._lock = threading.Lock()

    def check(self, secret: str) -> TokenRow | None:
        key = digest(secret)
        now = time.time()
        with self._lock:
            until, row = self._known.get(key, (0.0, None))
        if until <= now:
            row = self.store.token_by_digest(key)
            with self._lock:
                if len(self._known) > 10_000:
                    self._known.clear()  # a flood of bad tokens must not grow this forever
                self._known[key] = (now + self.remember, row)
        if row is None or row.revoked:
            return None
        with self._lock:
            due = now - self._touched.get(row.id, 0.0) >= TOUCH_EVERY
            if due:
                self._touched[row.id] = now
        if due:
            self.store.touch_token(row.id, now)
        return row
