"""Who is calling: a bearer token bound to a tenant, an admin tenant's token, or nobody.

No `from __future__ import annotations`: FastAPI reads TokenCheck.__call__'s
signature to see that it takes the request, and it cannot resolve a string
annotation on an instance's method (it has no module globals to look in).
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBearer

from freshpool.api.services import Services


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


# FastAPI re-examines every dependency on every call, and on a busy POST /requests
# that was half of the server's time. So each check is one dependency: no nested
# ones (the token check is an HTTPBearer itself rather than depending on one, which
# still puts the scheme in OpenAPI), and `async` (FastAPI runs a plain `def` in a
# worker thread, a hop that costs more than the check: one indexed read, usually
# answered from the checker's short cache).


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def token_caller(svc: Services, secret: str) -> Caller | None:
    """Who holds bearer token `secret`; None for an unknown or revoked token."""
    token = svc.tokens.check(secret)
    if token is None:
        return None
    return Caller(token.tenant, admin=token.tenant in svc.config.api.admin_tenants)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


class TokenCheck(HTTPBearer):
    """Who calls, from the bearer token; anonymous reads only where status is open."""

    def __init__(self, writes: bool) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="`freshpool token create --tenant T` prints one;"
            " send it as `Bearer TOKEN`.",
        )
        self.writes = writes

    async def __call__(self, request: Request) -> Caller:  # type: ignore[override]  # a caller, not credentials
        credentials = await super().__call__(request)
        svc: Services = request.app.state.services
        if credentials is None:
            if self.writes:
                raise _unauthorized("changing anything needs a bearer token")
            if not svc.config.api.open_status:
                raise _unauthorized("this server's status is closed: send a bearer token")
            return Caller(None)
        caller = token_caller(svc, credentials.credentials)
        if caller is None:
            raise _unauthorized("unknown or revoked token")
        return caller


Reader = Annotated[Caller, Depends(TokenCheck(writes=False))]
Writer = Annotated[Caller, Depends(TokenCheck(writes=True))]
Svc = Annotated[Services, Depends(services)]
