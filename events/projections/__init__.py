"""Read tables kept from the log: the projector and the calls the CLI makes.

``project`` (catch up once: the end of ``baton run``), ``rebuild`` (``baton projections
rebuild``: the read tables, then the findings of ``Detector``) and ``Projector`` for a
long-running process (``serve``, with a Detector after each catch-up). Importing this
package imports asyncpg: import it where it is used, not at the CLI's start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from events.postgres import PostgresEventStore
from events.projections.catalog import DEFAULT_ORGANIZATION_ID, NAMESPACE, derive
from events.projections.detect import Detector
from events.projections.page import READ_TABLES
from events.projections.projector import DEFAULT_NAME, PageHandler, Projector

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_ORGANIZATION_ID",
    "NAMESPACE",
    "READ_TABLES",
    "Detector",
    "PageHandler",
    "Projector",
    "derive",
    "project",
    "rebuild",
]

T = TypeVar("T")


async def _with_store(
    target: PostgresEventStore | str, action: Callable[[Projector], Awaitable[T]]
) -> T:
    if isinstance(target, PostgresEventStore):
        return await action(Projector(target))
    store = await PostgresEventStore.connect(target, min_size=1, max_size=2)
    try:
        return await action(Projector(store))
    finally:
        await store.aclose()


async def project(target: PostgresEventStore | str) -> int:
    """Bring the read tables up to date with the log; return the number of events applied.

    ``target`` is an open store (reused, left open) or a DSN. Raises StoreUnavailable or
    StoreError.
    """
    return await _with_store(target, Projector.catch_up)


async def rebuild(target: PostgresEventStore | str) -> int:
    """Rebuild every read table from the whole log, then judge it again for findings (none
    is recorded twice); return the number of events applied."""

    async def both(projector: Projector) -> int:
        applied = await projector.rebuild()
        await Detector(projector.store).rebuild()
        return applied

    return await _with_store(target, both)
