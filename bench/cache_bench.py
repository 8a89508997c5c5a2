"""Run-shaped events, the measuring helpers, and the context cache's section of
store_bench.py: ``ContextReader`` on a hit (Redis) and the fold of a 10,000-event run on a
miss. See STORE.md; run store_bench.py, which imports this module.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from events import types as ev
from events.cache import ContextReader
from events.cache_redis import RedisContextCache
from events.context import fold
from events.postgres import PostgresEventStore
from events.secrets import Cipher
from events.store import NewEvent, StreamAppend

CIPHER = Cipher(Fernet.generate_key())
BODY = (
    '{"products": [{"id": 3, "name": "mug", "price": 12.5, "stock": 40, "tags": ["kitchen"]},'
    ' {"id": 4, "name": "teapot", "price": 31.0, "stock": 7, "tags": ["kitchen", "tea"]},'
    ' {"id": 9, "name": "tray", "price": 18.25, "stock": 12, "tags": []}], "count": 3,'
    ' "page": 1, "next": "/catalog?page=2", "generated_at": "2026-11-23T21:00:00Z"}'
)
TICKS = os.sysconf("SC_CLK_TCK")


def test_events(name: str, n: int) -> list[ev.Event]:
    """Seven events per test, as a passing test with two assertions and one capture."""
    events: list[ev.Event] = [
        ev.TestStarted(name),
        ev.RequestSent(name, 1, "GET", f"http://127.0.0.1:8765/catalog?page={n}", {}, ""),
        ev.ResponseReceived(
            name,
            1,
            200,
            {"content-type": "application/json", "content-length": str(len(BODY))},
            BODY,
            ev.Timings(3.2),
        ),
        ev.AssertionEvaluated(name, 1, "status", "equals", 200, 200, True),
        ev.AssertionEvaluated(name, 1, "$.count", "gte", 1, 3, True),
    ]
    if n % 10 == 0:
        events.append(ev.AuthTokenUpdated(name, "auth.token", CIPHER.encrypt(f"jwt-{n}")))
    else:
        events.append(ev.VariableCaptured(name, f"product_{n}", n))
    events.append(ev.TestPassed(name, 1, 3.5))
    return events


def run_events(run_id: str, count: int) -> list[ev.Event]:
    """A run of exactly ``count`` events: RunStarted, whole tests, RunCompleted."""
    tests = (count - 2) // 7
    plan = [ev.PlannedTest(f"test_{n}") for n in range(tests + 1)]
    events: list[ev.Event] = [ev.RunStarted(run_id, "bench", "digest", plan)]
    n = 0
    while len(events) < count - 1:
        events.extend(test_events(f"test_{n}", n))
        n += 1
    del events[count - 1 :]
    events.append(ev.RunCompleted("passed", passed=n, failed=0, skipped=0, duration_ms=1.0))
    return events


def percentile(samples: Sequence[float], p: float) -> float:
    ordered = sorted(samples)  # nearest rank
    return ordered[max(0, min(len(ordered) - 1, round(p * len(ordered)) - 1))]


def ms(samples: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": percentile(samples, 0.50) * 1000,
        "p95": percentile(samples, 0.95) * 1000,
        "p99": percentile(samples, 0.99) * 1000,
    }


async def timed(action: Callable[[], Awaitable[object]], times: int) -> list[float]:
    for _ in range(min(times, 20)):  # warm-up: connections, prepared statements, caches
        await action()
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - started)
    return samples


def cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes have used so far: the server's backends
    are processes on this machine, so the bench can tell the server's CPU from its own."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone, or no /proc
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS


async def store_backends(store: PostgresEventStore, *others: asyncpg.Connection) -> list[int]:
    """The server processes behind the store's pool (the database's, less ``others``)."""
    skip = [other.get_server_pid() for other in others]
    pids: list[int] = await store.pool.fetchval(
        "SELECT array_agg(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND NOT pid = ANY($1::int[])",
        skip,
    )
    return pids


@asynccontextmanager
async def private_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"baton_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{admin_dsn.rpartition('/')[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def record(store: PostgresEventStore, run_id: str, events: list[ev.Event]) -> None:
    stream = ev.run_stream(run_id)
    for start in range(0, len(events), 1000):
        chunk = [NewEvent(event) for event in events[start : start + 1000]]
        await store.append([StreamAppend(stream, chunk, expected_version=start)])


async def cache(
    store: PostgresEventStore, redis_url: str, hits: int, folds: int, size: int
) -> dict[str, Any]:
    prefix = f"baton-bench-{secrets.token_hex(6)}:"
    redis_cache = RedisContextCache.from_url(redis_url, prefix=prefix)
    small, big = "cache-small", "cache-big"
    await record(store, small, run_events(small, 60))
    await record(store, big, run_events(big, size))
    stream = ev.run_stream(big)
    reader = ContextReader(store, redis_cache)
    result: dict[str, Any] = {}
    try:
        await reader.refresh(small)
        result["hit_reader"] = ms(await timed(lambda: reader.context(small), hits))
        result["hit_redis_get"] = ms(await timed(lambda: redis_cache.get(small), hits))
        result["version_query"] = ms(
            await timed(lambda: store.stream_version(ev.run_stream(small)), hits)
        )

        async def read_and_fold() -> None:
            fold(await store.read_stream(stream))

        async def reader_miss() -> None:
            await redis_cache.delete(big)
            await reader.context(big)

        pids = await store_backends(store)
        server, client_cpu = cpu_of(pids), time.process_time()
        result["miss_fold"] = ms(await timed(read_and_fold, folds))
        calls = folds + min(folds, 20)  # with the warm-up
        result["miss_fold_cpu_ms"] = {
            "client": (time.process_time() - client_cpu) / calls * 1000,
            "server": (cpu_of(pids) - server) / calls * 1000,
        }
        result["miss_reader"] = ms(await timed(reader_miss, folds))
        result["read_stream"] = ms(await timed(lambda: store.read_stream(stream), folds))
        recorded = await store.read_stream(stream)

        async def fold_only() -> None:
            fold(recorded)

        result["fold_only"] = ms(await timed(fold_only, folds))
    finally:
        await redis_cache.aclose()
        client = Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return result
