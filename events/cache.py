"""The context cache: the folded context of a run with the version it reflects.

Only a cache. A miss, a stale entry or a dead Redis costs a fold of events from the log,
never a wrong answer and never a failed run: ``ContextReader`` checks every cached context
against the stream's current version and folds the events it misses, and treats any cache
failure as a miss. Two backends behind ``ContextCache``: Redis (``BATON_REDIS_URL``) and
in-process; ``open_cache`` picks one. Secrets stay ciphertext in a Context, hence in Redis.

Importing this module imports neither redis nor the database driver (start-up time counts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from events.context import Context, context_at, fold
from events.errors import CacheError as CacheError
from events.errors import CacheUnavailable as CacheUnavailable
from events.errors import ContextError
from events.errors import ReaderError as ReaderError
from events.errors import UnknownRun as UnknownRun
from events.settings import Settings
from events.store import EventStore
from events.types import RecordedEvent, RunCancelled, RunCompleted, run_stream

DEFAULT_PREFIX = "baton:"
RETENTION_AFTER_END = 24 * 3600.0
"""Seed 002's retention: a run's context is kept 24 hours after the run ends."""
RUNNING_TTL = 7 * 24 * 3600.0
"""Safety TTL of a context whose run has not ended: a crashed run never ends, and its
entry must not stay forever. Any later read refreshes it."""

logger = logging.getLogger("baton.cache")


class ContextCache(Protocol):
    async def get(self, run_id: str) -> Context | None:
        """The cached context of the run, None on a miss. Raises CacheError."""
        ...

    async def put(self, context: Context, *, ttl: float | None) -> None:
        """Cache ``context`` under its ``run_id``, replacing any entry and its expiry.

        ``ttl`` in seconds; None keeps it until deleted or evicted; zero or less removes it.
        Raises CacheError.
        """
        ...

    async def delete(self, run_id: str) -> None:
        """Forget the run's context (no error if there is none). Raises CacheError."""
        ...

    async def expires_in(self, run_id: str) -> float | None:
        """Seconds the run's entry has left: None if absent, ``math.inf`` if it never expires."""
        ...

    async def aclose(self) -> None:
        """Release connections; never raises."""
        ...


def open_cache(settings: Settings, *, prefix: str = DEFAULT_PREFIX) -> ContextCache:
    """Redis at ``settings.redis_url`` if set, else an in-process cache.

    Connects lazily: an unreachable Redis shows as misses later, not as an error here.
    Raises CacheError for a URL that is not a Redis URL.
    """
    if settings.redis_url:
        from events.cache_redis import RedisContextCache

        return RedisContextCache.from_url(settings.redis_url, prefix=prefix)
    from events.cache_memory import MemoryContextCache

    return MemoryContextCache()


def _ended_at(events: Sequence[RecordedEvent]) -> float | None:
    for recorded in reversed(events):
        if isinstance(recorded.event, RunCompleted | RunCancelled):
            return recorded.recorded_at.timestamp()
    return None


class ContextReader:
    """A run's context: from the cache when it is current, else folded from the event log.

    "Current" costs one round trip to the store (the stream's version) on every read: the
    price of never answering with a stale context. A caller that knows the version it needs
    (from a notification, say) passes ``min_version`` and skips it.

    Two readers racing may put an older context over a newer one: the next read finds it
    behind the log and folds the difference, so a race costs a fold, never a stale answer.
    """

    def __init__(
        self,
        store: EventStore,
        cache: ContextCache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._cache = cache
        self._clock = clock
        self._cache_healthy = True

    async def context(
        self, run_id: str, *, at: int | None = None, min_version: int | None = None
    ) -> Context:
        """The run's context now, or right after global position ``at`` (time travel).

        Time travel always folds from the log and leaves the cache alone. Raises UnknownRun
        when the log holds no event of the run, StoreError when the store fails.
        """
        stream = run_stream(run_id)
        if at is not None:
            events = await self._store.read_stream(stream)
            if not events:
                raise UnknownRun(run_id)
            return context_at(events, at)
        cached = await self._get(run_id, stream)
        if cached is not None:
            if min_version is not None and cached.version >= min_version:
                return cached
            current = await self._store.stream_version(stream)
            if current == cached.version:
                return cached
            if current > cached.version:
                missing = await self._store.read_stream(stream, after_version=cached.version)
                try:
                    return await self._store_fold(run_id, fold(missing, cached), missing)
                except ContextError as exc:
                    logger.warning("cached context of %s does not fit the log: %s", run_id, exc)
            # Behind the cache, or not fitting: the entry came from another log (a database
            # restored or recreated under the same Redis). Rebuild it from this one.
            await self._delete(run_id)
        events = await self._store.read_stream(stream)
        if not events:
            raise UnknownRun(run_id)
        return await self._store_fold(run_id, fold(events), events)

    async def refresh(self, run_id: str) -> Context:
        """Bring the cached context up to the log, e.g. when a run ends, and return it.

        Never fails because of the cache (a dead Redis only means nothing is cached);
        raises UnknownRun or StoreError as ``context`` does.
        """
        return await self.context(run_id)

    def ttl(self, context: Context, ended_at: float | None) -> float:
        """How long to keep ``context``: 24 h after its run ended, RUNNING_TTL before.

        ``ended_at`` is when the run ended (epoch seconds), if the events folded last say so.
        """
        if context.status == "running":
            return RUNNING_TTL
        if ended_at is None:
            return RETENTION_AFTER_END
        return ended_at + RETENTION_AFTER_END - self._clock()

    async def _store_fold(
        self, run_id: str, context: Context, events: Sequence[RecordedEvent]
    ) -> Context:
        ttl = self.ttl(context, _ended_at(events))
        # A run that ended more than 24 hours ago is past retention: answered, not kept.
        # A stream without its RunStarted has no run id to be found under.
        if ttl > 0 and context.run_id == run_id:
            try:
                await self._cache.put(context, ttl=ttl)
            except CacheError as exc:
                self._failed(exc)
            else:
                self._recovered()
        return context

    async def _get(self, run_id: str, stream: str) -> Context | None:
        try:
            cached = await self._cache.get(run_id)
        except CacheError as exc:
            self._failed(exc)
            return None
        self._recovered()
        return cached if cached is not None and cached.stream == stream else None

    async def _delete(self, run_id: str) -> None:
        try:
            await self._cache.delete(run_id)
        except CacheError as exc:
            self._failed(exc)

    def _failed(self, exc: CacheError) -> None:
        # once per outage: a dead Redis under load must not flood the log
        if self._cache_healthy:
            self._cache_healthy = False
            logger.warning("context cache failing, answering from the event log: %s", exc)

    def _recovered(self) -> None:
        if not self._cache_healthy:
            self._cache_healthy = True
            logger.info("context cache answering again")
