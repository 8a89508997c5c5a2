"""What every controller uses: its dependencies, bulk requests, and small shared shapes."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import asyncpg
import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from context_service.auth import principal_of
from context_service.database import translated
from context_service.errors import BadRequest, FieldError, ServiceError, Unprocessable
from context_service.keys import Principal
from context_service.listing import ListParams, list_params
from context_service.services import Services

T = TypeVar("T")
R = TypeVar("R")
MAX_BULK = 100

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")]
"""A name: 1-200 characters, not starting or ending with a space."""
Description = Annotated[str, msgspec.Meta(max_length=2000)]


def _services(state: State) -> Services:
    services: Services = state.services
    return services


def _principal(request: Request[Any, Any, Any]) -> Principal:
    return principal_of(request)


ServicesDep = NamedDependency[Services]
PrincipalDep = NamedDependency[Principal]
PageDep = NamedDependency[ListParams]

DEPENDENCIES = {
    "services": Provide(_services, sync_to_thread=False),
    "principal": Provide(_principal, sync_to_thread=False),
    "page": Provide(list_params),
}


async def bulk(
    services: Services,
    items: Sequence[T],
    one: Callable[[asyncpg.Connection, T], Awaitable[R]],
    conn: asyncpg.Connection,
) -> list[R]:
    """Apply ``one`` to every item in ``conn``'s transaction: all of them or none.

    Every item is tried (each in a savepoint, so one failure does not hide the next), and
    if any failed the whole request is refused with one error per failed item.
    """
    if not items:
        raise BadRequest("a bulk request needs at least one item")
    if len(items) > MAX_BULK:
        raise BadRequest(f"a bulk request takes at most {MAX_BULK} items, not {len(items)}")
    results: list[R] = []
    errors: list[FieldError] = []
    for index, item in enumerate(items):
        try:
            with translated(services.db.dsn):
                async with conn.transaction():
                    results.append(await one(conn, item))
        except ServiceError as exc:
            errors.append(FieldError(exc.detail, index=index, status=int(exc.status)))
            errors.extend(
                msgspec.structs.replace(error, index=index, status=int(exc.status))
                for error in exc.errors
            )
    if errors:
        failed = len({error.index for error in errors})
        raise Unprocessable(
            f"{failed} of {len(items)} items cannot be written, so none was; "
            "see errors (index: the item)",
            errors,
        )
    return results


async def exists(conn: asyncpg.Connection, table: str, row_id: uuid.UUID) -> bool:
    """Whether the caller's organization has this row (row-level security decides)."""
    found: bool = await conn.fetchval(f"SELECT EXISTS (SELECT FROM {table} WHERE id = $1)", row_id)
    return found
