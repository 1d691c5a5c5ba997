"""Who we are to GitHub: a personal access token, or a GitHub App's installation.

An App signs a short JWT with its private key, trades it for an installation token
(valid an hour), and trades again before that one runs out. Every REST call asks
`Auth.header()` afresh, so a long-running serve never sends an expired token.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Protocol

import jwt

from freshpool.core.errors import BadInput
from freshpool.integrations.ciserver import CiServer, CiServerError

# GitHub refuses a JWT that lives longer than ten minutes; its clock may be behind ours.
JWT_LIFETIME = 540
CLOCK_SKEW = 60
# Trade for a new installation token this long before the old one expires.
REFRESH_MARGIN = 300.0


class AuthError(BadInput):
    """GitHub refused our credentials: a clear error at start, naming what to fix."""


class Auth(Protocol):
    def header(self) -> str: ...


class TokenAuth:
    """A personal access token (classic or fine-grained) or any fixed token."""

    def __init__(self, token: str) -> None:
        if not token.strip():
            raise AuthError("github.token: empty")
        self._value = f"Bearer {token.strip()}"

    def header(self) -> str:
        return self._value


def app_jwt(app_id: str, private_key: str, now: float | None = None) -> str:
    """The App's own short-lived JWT (RS256, issuer = the App's id or client id)."""
    issued = int(now if now is not None else time.time()) - CLOCK_SKEW
    claims = {"iat": issued, "exp": issued + JWT_LIFETIME, "iss": app_id}
    return jwt.encode(claims, private_key, algorithm="RS256")


def _expiry(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class AppAuth:
    """A GitHub App installation's token, fetched on first use and refreshed."""

    def __init__(self, server: CiServer, app_id: str, private_key: str, scope_path: str,
                 installation_id: int | None = None) -> None:  # fmt: skip
        self.server = server
        self.app_id = app_id
        self.scope_path = scope_path
        self.installation_id = installation_id
        self.refreshes = 0
        self._key = private_key
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()
        try:
            jwt.encode({"iss": app_id}, private_key, algorithm="RS256")
        except (ValueError, TypeError) as exc:
            why = f"not an RSA private key ({exc})"
            raise AuthError(f"github.app.private-key-file: {why}") from None

    def header(self) -> str:
        with self._lock:
            if time.time() > self._expires - REFRESH_MARGIN:
                self._refresh()
            return f"Bearer {self._token}"

    def _as_app(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {app_jwt(self.app_id, self._key)}"}

    def _refresh(self) -> None:
        try:
            if self.installation_id is None:
                found = self.server.json("GET", f"{self.scope_path}/installation",
                                         headers=self._as_app())  # fmt: skip
                self.installation_id = int(found["id"])
            path = f"/app/installations/{self.installation_id}/access_tokens"
            answer = self.server.json("POST", path, headers=self._as_app())
        except CiServerError as exc:
            raise _refused(exc, self.app_id, self.scope_path) from None
        self._token = answer["token"]
        self._expires = _expiry(answer["expires_at"])
        self.refreshes += 1


def _refused(exc: CiServerError, app_id: str, scope_path: str) -> Exception:
    if exc.status == 401:
        return AuthError(
            f"github.app: GitHub refused the App's JWT (app-id {app_id}, private-key-file): {exc}"
        )
    if exc.status == 404:
        return AuthError(
            f"github.app: App {app_id} is not installed on {scope_path.split('/', 2)[2]} "
            "(or installation-id is wrong)"
        )
    return exc
