"""The context cache: one contract for both backends (in-process, and Redis for real at
127.0.0.1:6379 under this session's key prefix), the reader that never answers stale, and
what happens when Redis is unreachable, silent, or killed mid-run. The log the reader folds
is the in-memory event store: the reader is what is tested, not the store."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

import msgspec
import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from events import types as ev
from events.cache import (
    RETENTION_AFTER_END,
    RUNNING_TTL,
    CacheError,
    ContextCache,
    ContextReader,
    UnknownRun,
    open_cache,
)
from events.cache_memory import MemoryContextCache
from events.cache_redis import RedisContextCache
from events.context import Context, context_at, fold
from events.memory import MemoryEventStore
from events.secrets import Cipher
from events.settings import Settings
from events.store import EventStore, NewEvent, StreamAppend
from tests.conftest import RedisServer

CIPHER = Cipher(Fernet.generate_key())
CANARY_TOKEN = "canary-token-4e1f9b"
CANARY_PASSWORD = "canary-pass-7c2d08"


# ---- data ---------------------------------------------------------------------------------


def first_half(run_id: str) -> list[ev.Event]:
    plan = [ev.PlannedTest("login"), ev.PlannedTest("catalog"), ev.PlannedTest("cart")]
    return [
        ev.RunStarted(run_id, "shop checkout", "digest", plan, environment="staging"),
        ev.TestStarted("login"),
        ev.RequestSent("login", 1, "POST", "http://shop/auth/login"),
        ev.ResponseReceived("login", 1, 200, {}, "{}", ev.Timings(12.0)),
        ev.AuthTokenUpdated("login", "auth.token", CIPHER.encrypt(CANARY_TOKEN)),
        ev.VariableCaptured("login", "user_id", 7),
        ev.TestPassed("login", 1, 12.5),
    ]


def second_half() -> list[ev.Event]:
    return [
        ev.TestStarted("catalog"),
        ev.VariableCaptured("catalog", "product_id", 3),
        ev.VariableCaptured("catalog", "cart.pass", CIPHER.encrypt(CANARY_PASSWORD), secret=True),
        ev.TestPassed("catalog", 1, 8.0),
        ev.TestStarted("cart"),
        ev.TestStarted("cart", attempt=2),
        ev.TestFailed("cart", 2, 30.0, "server_error", "503 from /cart"),
        ev.TestSkipped("checkout", "cart failed", "dependency_skipped"),
        ev.RunCompleted("failed", passed=1, failed=1, skipped=1, duration_ms=60.0),
    ]


def realistic_context() -> Context:
    run_id = str(uuid.uuid4())
    when = datetime(2025, 1, 1, tzinfo=UTC)
    events = [*first_half(run_id), *second_half()]
    return fold(
        ev.RecordedEvent(uuid.uuid4(), ev.run_stream(run_id), n, 100 + 3 * n, when, event)
        for n, event in enumerate(events, 1)
    )


async def record(store: EventStore, run_id: str, events: Sequence[ev.Event]) -> None:
    stream = ev.run_stream(run_id)
    await store.append([StreamAppend(stream, [NewEvent(event) for event in events])])


async def new_run(store: EventStore, *, ended: bool) -> str:
    """A run in the log: its first test passed; if ``ended``, the rest and RunCompleted too."""
    run_id = str(uuid.uuid4())
    await record(store, run_id, [*first_half(run_id), *(second_half() if ended else [])])
    return run_id


async def log_fold(store: EventStore, run_id: str) -> Context:
    return fold(await store.read_stream(ev.run_stream(run_id)))


Closing = Callable[[ContextCache], ContextCache]


def hours_from_now(hours: float) -> Callable[[], float]:
    return lambda: time.time() + hours * 3600


class CountingStore(MemoryEventStore):
    """An event store counting the reads the reader makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    async def read_stream(
        self,
        stream: str,
        after_version: int = 0,
        *,
        after_position: int = 0,
        through_position: int | None = None,
        limit: int | None = None,
    ) -> list[ev.RecordedEvent]:
        self.calls.append(("read_stream", after_version))
        return await super().read_stream(
            stream,
            after_version,
            after_position=after_position,
            through_position=through_position,
            limit=limit,
        )

    async def stream_version(self, stream: str, *, through_position: int | None = None) -> int:
        self.calls.append(("stream_version", 0))
        return await super().stream_version(stream, through_position=through_position)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def store() -> EventStore:
    return MemoryEventStore()


@pytest.fixture
def counting() -> CountingStore:
    return CountingStore()


@pytest.fixture(params=["memory", "redis"])
async def cache(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[ContextCache]:
    backend: ContextCache
    if request.param == "memory":
        backend = MemoryContextCache()
    else:
        backend = RedisContextCache.from_url(redis_url, prefix=redis_prefix)
    yield backend
    await backend.aclose()


@pytest.fixture
async def redis_cache(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisContextCache]:
    cache = RedisContextCache.from_url(redis_url, prefix=redis_prefix)
    yield cache
    await cache.aclose()


@pytest.fixture
async def closing() -> AsyncIterator[Closing]:
    """Closes the caches a test opens, whatever happens in it."""
    opened: list[ContextCache] = []

    def close_later(cache: ContextCache) -> ContextCache:
        opened.append(cache)
        return cache

    yield close_later
    for cache in opened:
        await cache.aclose()


# ---- the contract, on both backends ---------------------------------------------------------


async def test_a_context_comes_back_as_it_was_put(cache: ContextCache) -> None:
    context = realistic_context()
    for field in msgspec.structs.fields(Context):
        assert getattr(context, field.name) != field.default, field.name  # all fields count
    await cache.put(context, ttl=60)
    assert await cache.get(context.run_id) == context


async def test_a_miss_before_put_and_after_delete(cache: ContextCache) -> None:
    context = realistic_context()
    assert await cache.get(context.run_id) is None
    assert await cache.expires_in(context.run_id) is None
    await cache.put(context, ttl=None)
    await cache.delete(context.run_id)
    assert await cache.get(context.run_id) is None
    await cache.delete(context.run_id)  # forgetting twice is harmless


async def test_put_replaces_the_context_and_its_expiry(cache: ContextCache) -> None:
    context = realistic_context()
    await cache.put(context, ttl=30)
    newer = msgspec.structs.replace(context, version=context.version + 5, status="passed")
    await cache.put(newer, ttl=None)
    assert await cache.get(context.run_id) == newer
    assert await cache.expires_in(context.run_id) == math.inf


async def test_an_entry_expires_after_its_ttl(cache: ContextCache) -> None:
    short, kept, dropped = realistic_context(), realistic_context(), realistic_context()
    await cache.put(short, ttl=1.0)
    await cache.put(kept, ttl=None)
    await cache.put(dropped, ttl=60)
    await cache.put(dropped, ttl=0)  # no time left: gone at once
    left = await cache.expires_in(short.run_id)
    assert left is not None and 0 < left <= 1.0
    assert await cache.get(dropped.run_id) is None
    await asyncio.sleep(1.1)
    assert await cache.get(short.run_id) is None
    assert await cache.get(kept.run_id) == kept


# ---- the reader, on both backends -----------------------------------------------------------


async def test_a_current_cached_context_is_answered_without_reading_the_stream(
    cache: ContextCache, counting: CountingStore
) -> None:
    run_id = await new_run(counting, ended=True)
    reader = ContextReader(counting, cache)
    first = await reader.context(run_id)
    assert counting.calls == [("read_stream", 0)]  # a miss folds the whole stream
    assert first == await log_fold(counting, run_id)
    counting.calls.clear()
    assert await reader.context(run_id) == first
    assert counting.calls == [("stream_version", 0)]  # the hit only checks the version


async def test_new_events_are_folded_onto_a_stale_context_never_answered_stale(
    cache: ContextCache, counting: CountingStore
) -> None:
    run_id = await new_run(counting, ended=False)
    reader = ContextReader(counting, cache)
    before = await reader.context(run_id)
    assert (before.status, before.version) == ("running", 7)
    await record(counting, run_id, second_half())
    counting.calls.clear()
    after = await reader.context(run_id)
    assert counting.calls == [("stream_version", 0), ("read_stream", 7)]  # the missing only
    assert after == await log_fold(counting, run_id)
    assert (after.status, after.version) == ("failed", 16)
    assert await cache.get(run_id) == after  # and the cache caught up


async def test_min_version_the_cache_reaches_skips_the_store(
    cache: ContextCache, counting: CountingStore
) -> None:
    run_id = await new_run(counting, ended=False)
    reader = ContextReader(counting, cache)
    cached = await reader.context(run_id)
    counting.calls.clear()
    assert await reader.context(run_id, min_version=cached.version) == cached
    assert counting.calls == []
    await record(counting, run_id, second_half())
    newer = await reader.context(run_id, min_version=cached.version + 1)
    assert newer.version == 16


async def test_an_unknown_run_is_an_error_not_an_empty_context(
    cache: ContextCache, counting: CountingStore
) -> None:
    reader = ContextReader(counting, cache)
    run_id = str(uuid.uuid4())
    with pytest.raises(UnknownRun, match=run_id):
        await reader.context(run_id)
    with pytest.raises(UnknownRun):
        await reader.context(run_id, at=10)
    assert await cache.get(run_id) is None


async def test_time_travel_folds_from_the_log_and_leaves_the_cache_alone(
    cache: ContextCache, store: EventStore
) -> None:
    run_id = await new_run(store, ended=True)
    events = await store.read_stream(ev.run_stream(run_id))
    reader = ContextReader(store, cache)
    then = await reader.context(run_id, at=events[6].position)
    assert then == context_at(events, events[6].position)
    assert (then.version, then.statuses) == (7, {"login": "passed"})
    assert await cache.get(run_id) is None


async def test_a_context_from_another_log_is_rebuilt_from_this_one(
    cache: ContextCache, store: EventStore
) -> None:
    # the database was recreated under the same Redis: the cache is ahead of the log
    run_id = await new_run(store, ended=False)
    truth = await log_fold(store, run_id)
    await cache.put(msgspec.structs.replace(truth, version=40, status="passed"), ttl=60)
    reader = ContextReader(store, cache)
    assert await reader.context(run_id) == truth
    assert await cache.get(run_id) == truth


async def test_a_context_is_kept_24_hours_after_its_run_ends(
    cache: ContextCache, store: EventStore
) -> None:
    running = await new_run(store, ended=False)
    ended = await new_run(store, ended=True)
    reader = ContextReader(store, cache)
    await reader.refresh(running)
    await reader.refresh(ended)
    running_left = await cache.expires_in(running)
    ended_left = await cache.expires_in(ended)
    assert running_left is not None and RUNNING_TTL - 60 < running_left <= RUNNING_TTL
    assert ended_left is not None and RETENTION_AFTER_END - 60 < ended_left <= RETENTION_AFTER_END

    # read back 23 hours after it ended: one hour left; 25 hours after: answered, not kept
    for hours, kept in ((23, True), (25, False)):
        await cache.delete(ended)
        later = ContextReader(store, cache, clock=hours_from_now(hours))
        assert (await later.context(ended)).status == "failed"
        left = await cache.expires_in(ended)
        if kept:
            assert left is not None and 3600 - 60 < left <= 3600
        else:
            assert left is None


# ---- one backend only ------------------------------------------------------------------------


async def test_the_in_process_cache_drops_the_least_recently_used_beyond_its_bound() -> None:
    cache = MemoryContextCache(max_entries=2)
    first, second, third = realistic_context(), realistic_context(), realistic_context()
    await cache.put(first, ttl=None)
    await cache.put(second, ttl=None)
    assert await cache.get(first.run_id) == first  # now the most recently used
    await cache.put(third, ttl=None)
    assert [await cache.get(c.run_id) for c in (first, second, third)] == [first, None, third]


async def test_secrets_stay_encrypted_in_redis(
    redis_cache: RedisContextCache, redis_client: Redis, store: EventStore
) -> None:
    run_id = await new_run(store, ended=True)
    context = await ContextReader(store, redis_cache).refresh(run_id)
    raw = await redis_client.get(redis_cache.key(run_id))
    assert raw is not None
    assert CANARY_TOKEN.encode() not in raw
    assert CANARY_PASSWORD.encode() not in raw
    assert context.auth["token"].encode() in raw  # the ciphertext is what is stored


async def test_redis_keys_carry_the_ttl(
    redis_cache: RedisContextCache, redis_prefix: str, redis_client: Redis
) -> None:
    context = realistic_context()
    key = redis_cache.key(context.run_id)
    assert key == f"{redis_prefix}context:{context.run_id}"
    await redis_cache.put(context, ttl=1.5)
    assert 0 < await redis_client.pttl(key) <= 1500
    await redis_cache.put(context, ttl=None)
    assert await redis_client.pttl(key) == -1


async def test_an_undecodable_entry_is_a_miss_and_is_replaced(
    redis_cache: RedisContextCache, redis_client: Redis, store: EventStore
) -> None:
    run_id = await new_run(store, ended=False)
    await redis_client.set(redis_cache.key(run_id), b"\x93not a context")
    with pytest.raises(CacheError):
        await redis_cache.get(run_id)
    truth = await log_fold(store, run_id)
    assert await ContextReader(store, redis_cache).context(run_id) == truth
    assert await redis_cache.get(run_id) == truth


async def test_open_cache_picks_redis_when_the_url_is_set(
    redis_url: str, redis_prefix: str, redis_client: Redis, closing: Closing
) -> None:
    context = realistic_context()
    await closing(open_cache(Settings(redis_url=redis_url), prefix=redis_prefix)).put(
        context, ttl=9
    )
    assert await redis_client.exists(f"{redis_prefix}context:{context.run_id}") == 1
    assert isinstance(open_cache(Settings()), MemoryContextCache)
    with pytest.raises(CacheError, match=r"http://u:\*\*\*@h"):
        open_cache(Settings(redis_url="http://u:hunter2@h/0"))


# ---- Redis unreachable, silent, or killed -------------------------------------------------------


async def test_a_closed_port_answers_from_the_log_and_warns_once(
    store: EventStore, caplog: pytest.LogCaptureFixture, closing: Closing
) -> None:
    run_id = await new_run(store, ended=True)
    truth = await log_fold(store, run_id)
    cache = closing(open_cache(Settings(redis_url="redis://:hunter2@127.0.0.1:1/0")))
    reader = ContextReader(store, cache)
    started = time.monotonic()
    answers = [await reader.context(run_id) for _ in range(5)]
    answers.append(await reader.refresh(run_id))
    assert time.monotonic() - started < 2.0
    assert answers == [truth] * 6
    warnings = [r for r in caplog.records if r.name == "baton.cache" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "127.0.0.1:1" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text


async def test_a_redis_that_never_answers_costs_one_timeout_not_one_per_read(
    store: EventStore, closing: Closing
) -> None:
    run_id = await new_run(store, ended=False)
    truth = await log_fold(store, run_id)
    with socket.socket() as silent:  # connections queue in the backlog, nothing replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        reader = ContextReader(store, closing(RedisContextCache.from_url(url, timeout=0.25)))
        started = time.monotonic()
        answers = [await reader.context(run_id) for _ in range(10)]
        elapsed = time.monotonic() - started
    assert answers == [truth] * 10
    # one 0.25 s socket timeout, not one per read (2.5 s) nor one per retry: it backs off
    # (the margin is for a loaded CI machine; one timeout per read would take 2.5 s)
    assert elapsed < 1.5


async def test_redis_killed_mid_run_then_restarted(
    private_redis: RedisServer,
    counting: CountingStore,
    caplog: pytest.LogCaptureFixture,
    closing: Closing,
) -> None:
    caplog.set_level(logging.INFO, logger="baton.cache")
    run_id = await new_run(counting, ended=False)
    cache = closing(RedisContextCache.from_url(private_redis.url, retry_after=0.3))
    reader = ContextReader(counting, cache)
    await reader.context(run_id)
    counting.calls.clear()
    assert (await reader.context(run_id)).version == 7
    assert counting.calls == [("stream_version", 0)]  # served by Redis

    private_redis.kill()
    await record(counting, run_id, second_half())  # the run goes on and ends
    started = time.monotonic()
    after = await reader.context(run_id)
    assert after == await log_fold(counting, run_id)
    assert after.status == "failed"  # not the stale "running" Redis held
    assert (await reader.refresh(run_id)) == after  # warming the cache does not fail
    assert time.monotonic() - started < 1.0

    private_redis.start()
    await asyncio.sleep(0.35)  # past retry_after: the reader tries Redis again
    assert await reader.refresh(run_id) == after
    assert await cache.get(run_id) == after  # cached in the new server
    levels = [r.levelname for r in caplog.records if r.name == "baton.cache"]
    assert levels == ["WARNING", "INFO"]
