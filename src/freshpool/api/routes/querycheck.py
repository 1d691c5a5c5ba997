"""The route class of every API router: a misspelt query parameter is an error.

`?wiat=30` must not be silently ignored. The check wraps each route's handler
instead of being a dependency: FastAPI re-examines every dependency on every
call, and one more on each call of POST /requests cost more than the check.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from functools import cached_property
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class QueryCheckedRoute(APIRoute):
    @cached_property
    def known_query(self) -> frozenset[str]:
        """The query parameters this route takes."""
        return frozenset(_query_names(self.dependant))

    def unknown_query(self, request: Request) -> list[str]:
        """The call's query parameters this route does not take."""
        return [name for name in request.query_params if name not in self.known_query]

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        known = self.known_query

        async def strict(request: Request) -> Response:
            unknown = self.unknown_query(request)
            if unknown:
                raise RequestValidationError(
                    [
                        {
                            "type": "unknown_parameter",
                            "loc": ("query", name),
                            "msg": "unknown query parameter"
                            f" (known: {', '.join(sorted(known)) or 'none'})",
                            "input": request.query_params[name],
                        }
                        for name in unknown
                    ]
                )
            return await handler(request)

        return strict


def _query_names(dependant: Dependant) -> Iterator[str]:
    yield from (q.alias for q in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)
