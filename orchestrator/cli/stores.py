"""The event store and its DSN, opened for one command."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.cli.signals import T, _run


def _with_dsn(action: Callable[[str], Any]) -> str:
    from events.embedded import start_embedded
    from events.settings import Settings

    async def go() -> str:
        settings = Settings.from_env()
        dsn = settings.database_url or await start_embedded(settings.home)
        return str(await action(dsn))

    return _run(go())


def _with_store(action: Callable[[Any], Awaitable[T]]) -> T:
    from events import open_store
    from events.settings import Settings

    async def go() -> T:
        store = await open_store(Settings.from_env())
        try:
            return await action(store)
        finally:
            await store.aclose()

    return _run(go())
