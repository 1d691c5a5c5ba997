"""Who is calling: a bearer token bound to a tenant, an admin tenant's token, or nobody."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from freshpool.api.services import Services

_bearer = HTTPBearer(
    auto_error=False,
    description="`freshpool token create --tenant T` prints one; send it as `Bearer TOKEN`.",
)


@dataclass(frozen=True)
class Caller:
    tenant: str | None
    admin: bool = False

    @property
    def anonymous(self) -> bool:
        return self.tenant is None

    def sees(self, tenant: str) -> bool:
        """Whether this caller may see something of `tenant` (open status shows everything)."""
        return self.admin or self.anonymous or tenant == self.tenant

    def owns(self, tenant: str) -> bool:
        """Whether this caller may act on, or reach, something of `tenant`."""
        return self.admin or (not self.anonymous and tenant == self.tenant)


# Dependencies are `async def`: FastAPI runs plain `def` ones in a worker thread, and
# each such hop costs more than the work here (a token check is one indexed read,
# usually answered from the checker's short cache). They are also flat (each takes
# the request itself rather than other dependencies): FastAPI re-examines every
# dependency on every call, and on a busy POST /requests that was half of the
# server's time.

Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    if credentials is None:
        return Caller(None)
    svc: Services = request.app.state.services
    token = svc.tokens.check(credentials.credentials)
    if token is None:
        raise _unauthorized("unknown or revoked token")
    return Caller(token.tenant, admin=token.tenant in svc.config.api.admin_tenants)


async def reader(request: Request, credentials: Bearer) -> Caller:
    """Reads are open without a token when the config says status is open."""
    who = _caller(request, credentials)
    if who.anonymous and not request.app.state.services.config.api.open_status:
        raise _unauthorized("this server's status is closed: send a bearer token")
    return who


async def writer(request: Request, credentials: Bearer) -> Caller:
    who = _caller(request, credentials)
    if who.anonymous:
        raise _unauthorized("changing anything needs a bearer token")
    return who


Reader = Annotated[Caller, Depends(reader)]
Writer = Annotated[Caller, Depends(writer)]
Svc = Annotated[Services, Depends(services)]
