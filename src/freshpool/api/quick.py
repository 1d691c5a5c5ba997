"""Routes whose well-formed calls skip FastAPI's per-call work.

FastAPI solves a route's parameters and dependencies anew on every call. On
POST /requests, the call CI makes most, that was over half of the API's own cost
per hand-out (profiled: about 200 of 380 us). A quick route first gives the call to
a plain function that accepts only a call FastAPI would accept too, and answers
it. For anything else (no token, a bad query, a body that does not validate) that
function returns None before it has changed anything, and FastAPI handles the
call as it always did. So every error's status, order and shape stay FastAPI's,
and so does the OpenAPI schema; the strict query check runs before either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from freshpool.api.strict import Handler, StrictQueryRoute

# Answers a well-formed call, or returns None (having changed nothing) to have
# FastAPI handle it.
Quick = Callable[[Request], Awaitable[Response | None]]


def quick_route(quick: Quick) -> type[StrictQueryRoute]:
    """A route class whose calls go to `quick` first."""

    class QuickRoute(StrictQueryRoute):
        def checked_handler(self) -> Handler:
            # Inside the strict query check: `quick` sees only known parameters.
            full = super().checked_handler()

            async def handler(request: Request) -> Response:
                # The body `quick` read stays cached on the request, for FastAPI.
                answer = await quick(request)
                return answer if answer is not None else await full(request)

            return handler

    return QuickRoute
