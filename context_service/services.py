"""What the app holds while it runs: the store, the cache, the projector, the run launcher.

``Services.open`` is the app's start-up (no I/O happens at import or in ``create_app``),
``aclose`` its shut-down; ``health`` reports each dependency with its state for /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from context_service.database import Database
from context_service.launcher import RunLauncher
from context_service.queued import QueuedRuns
from events.archive import archive_dir
from events.cache import ContextCache, ContextReader, open_cache
from events.owners import Owner
from events.projections import Detector, Projector
from events.retention_apply import Clock, apply_periodically, wall_clock
from events.secrets import Cipher, load_key
from events.settings import Settings, mask_dsn
from events.store import EventStore
from events.writer import GroupAppends
from orchestrator.queue import JobQueue

_log = logging.getLogger("baton.service")
_PROBE_TIMEOUT = 3.0
_PROJECTED_WITHIN = 30.0
"""Seconds a finished run waits for the projector before it reports done anyway."""


class Dependency(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    status: str
    """"ok", "degraded" (working around a failure) or "down"."""
    detail: str = ""
    latency_ms: float | None = None


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str
    """"ok", "degraded" or "down": all that is told without a key."""
    dependencies: list[Dependency] = []
    """Each dependency, where it is (a masked DSN, the Redis URL) and the log positions:
    told only to a caller with a valid key."""


@dataclass
class Services:
    settings: Settings
    store: EventStore
    """The log: every read and append of events goes through it."""
    db: Database
    """The read tables (and keys, organizations), on the PostgreSQL store's pool."""
    cache: ContextCache
    reader: ContextReader
    cipher: Cipher
    launcher: RunLauncher
    projector: Projector
    detector: Detector
    owner: Owner
    queued: QueuedRuns | None = None
    """With BATON_QUEUE_URL: the runs it put on the worker queue instead of the launcher."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the service starts to shut down: live streams end at once (their clients
    resume elsewhere with Last-Event-ID) instead of holding the shut-down open."""
    _live_streams: int = 0
    _no_live_streams: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _projector_task: asyncio.Task[None] | None = None
    _following: asyncio.Task[None] | None = None
    _retention_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def live_stream(self) -> Iterator[None]:
        """Count a live stream while it is open, so ``drain`` can wait for its goodbye."""
        self._live_streams += 1
        self._no_live_streams.clear()
        try:
            yield
        finally:
            self._live_streams -= 1
            if not self._live_streams:
                self._no_live_streams.set()

    async def drain(self, within: float) -> None:
        """Tell every live stream to end, and wait (at most ``within`` s) until each has
        said so to its client: a WebSocket's 1001 goes out before the server's own close."""
        self.draining.set()
        if self._live_streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_live_streams.wait(), within)

    @classmethod
    async def open(
        cls, settings: Settings, *, concurrency: int = 10, clock: Clock = wall_clock
    ) -> Services:
        """Connect (schema applied), check the service's role, start the projector and the
        retention applies (every ``settings.retention_interval`` s, as of ``clock()``)."""
        from events import open_store
        from orchestrator.execution import make_transport
        from orchestrator.targets import TargetPolicy

        targets = TargetPolicy.parse(settings.allowed_targets)  # a bad value: before connecting
        cipher = Cipher(load_key(settings.secret_key, settings.home))
        store = await open_store(settings)
        try:
            db = Database(store.pool, store.dsn)
            await db.check()
        except BaseException:
            await store.aclose()
            raise
        # the owner of this process's runs: its first sweep ends the runs that a killed
        # instance (this one before a restart, or another) left open
        owner = Owner(store, timeout=settings.owner_timeout)
        try:
            await owner.start()
        except BaseException:
            await store.aclose()
            raise
        cache = open_cache(settings)
        projector = Projector(store)

        async def projected(position: int) -> None:
            # the read tables hold a finished run before its task reports it done. One
            # projector per process does the work (serve, below); a run only waits for it:
            # a projection per run would have every pooled connection waiting on the
            # checkpoint's lock
            if not await projector.wait_until(position, within=_PROJECTED_WITHIN):
                _log.warning(
                    "the projector has not reached position %d within %g s; the run is"
                    " reported done before its read tables show it",
                    position,
                    _PROJECTED_WITHIN,
                )

        launcher = RunLauncher(
            GroupAppends(owner),
            cipher,
            transport=make_transport(concurrency, targets),
            concurrency=concurrency,
            max_wait=settings.store_wait,
            after_run=projected,
            owner=owner,
            excerpt_limit=settings.excerpt_limit,
        )
        queued: QueuedRuns | None = None
        if settings.queue_url:
            queue = JobQueue(settings.queue_url)
            try:
                await queue.ensure_group()  # a wrong BATON_QUEUE_URL fails the start-up, at once
            except BaseException:
                await queue.aclose()
                await owner.aclose()
                await store.aclose()
                raise
            queued = QueuedRuns(
                queue,
                store,
                db,
                cipher,
                allowed_targets=settings.allowed_targets,
                concurrency=concurrency,
                after_run=projected,
            )
        services = cls(
            settings=settings,
            store=store,
            db=db,
            cache=cache,
            reader=ContextReader(store, cache),
            cipher=cipher,
            launcher=launcher,
            projector=projector,
            detector=Detector(store),
            owner=owner,
            queued=queued,
        )
        if queued is not None:
            await queued.follow_queued()
            services._following = asyncio.create_task(
                queued.follow(services._stop), name="baton-queued-runs"
            )
        services._projector_task = asyncio.create_task(
            services.projector.serve(stop=services._stop, then=services.detector.catch_up),
            name="baton-projector",
        )
        if settings.retention_interval is not None:
            services._retention_task = asyncio.create_task(
                apply_periodically(
                    store,
                    archive_dir(settings.home, settings.archive_dir),
                    interval=settings.retention_interval,
                    stop=services._stop,
                    clock=clock,
                    cache=cache,
                ),
                name="baton-retention",
            )
        return services

    async def aclose(self) -> None:
        await self.launcher.aclose()
        # runs on the queue are the workers': they go on while the service is away
        self._stop.set()
        if self._following is not None:
            await asyncio.gather(self._following, return_exceptions=True)
        if self.queued is not None:
            await self.queued.aclose()
        for task in (self._projector_task, self._retention_task):
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)
        await self.owner.aclose()
        await self.cache.aclose()
        await self.store.aclose()

    async def health(self) -> Health:
        probes = [self._postgres(), self._redis(), self._projector()]
        if self.queued is not None:
            probes.append(self._queue(self.queued))
        checks = await asyncio.gather(*probes)
        worst = "ok"
        for check in checks:
            if check.status == "down" or (check.status == "degraded" and worst == "ok"):
                worst = check.status
        return Health(worst, list(checks))

    async def _postgres(self) -> Dependency:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self.db.pool.fetchval("SELECT 1"), _PROBE_TIMEOUT)
        except Exception as exc:  # any failure of a probe is "down"
            return Dependency("postgresql", "down", type(exc).__name__)
        where = mask_dsn(self.settings.database_url) if self.settings.database_url else "embedded"
        return Dependency("postgresql", "ok", where, _elapsed(start))

    async def _redis(self) -> Dependency:
        if not self.settings.redis_url:
            return Dependency("redis", "ok", "not configured: in-process context cache")
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self.cache.get("health-probe"), _PROBE_TIMEOUT)
        except Exception as exc:  # the cache is only a cache: a dead Redis degrades
            return Dependency(
                "redis", "degraded", f"{type(exc).__name__}: contexts are read from the log"
            )
        return Dependency("redis", "ok", mask_dsn(self.settings.redis_url), _elapsed(start))

    async def _queue(self, queued: QueuedRuns) -> Dependency:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(queued.queue.server(), _PROBE_TIMEOUT)
        except Exception as exc:  # reads go on; only new runs cannot start
            return Dependency("queue", "degraded", f"{type(exc).__name__}: runs cannot be started")
        where = mask_dsn(self.settings.queue_url) if self.settings.queue_url else ""
        return Dependency("queue", "ok", f"{where}: runs go to baton worker", _elapsed(start))

    async def _projector(self) -> Dependency:
        task = self._projector_task
        if task is None or task.done():
            return Dependency("projector", "down", "not running")
        try:
            # at once, not one after another: under load each waits for a pooled connection
            (position, behind), judged = await asyncio.wait_for(
                asyncio.gather(self.projector.progress(), self.detector.position()),
                _PROBE_TIMEOUT,
            )
        except Exception as exc:
            return Dependency("projector", "down", type(exc).__name__)
        detail = f"at position {position}, {behind} event(s) behind; findings judged to {judged}"
        return Dependency("projector", "ok", detail)


def _elapsed(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
