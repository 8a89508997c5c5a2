"""The context cache: a read on a hit, and the fold of a 10,000-event run on a miss.

Against the real servers: PostgreSQL (a private database, dropped afterwards) and Redis
(keys under a private prefix, deleted afterwards). Measured, each as p50/p99:

- hit: ``cache.get`` alone (Redis: one GET and a msgpack decode), and
  ``ContextReader.context`` (the same plus the stream-version query that keeps answers
  fresh), for a typical run's context and for the 10,000-event run's;
- miss: ``fold(await store.read_stream(...))`` of the 10,000-event run (read, decode of
  every event, fold), and ``ContextReader.context`` on a miss (the same plus the SET).

Targets (issue 5): hit p99 under 1 ms; the 10,000-event fold under 50 ms.

    python bench/cache_bench.py [--pg DSN] [--redis URL] [--hits 5000] [--folds 50]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial

import asyncpg
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from events import types as ev
from events.cache import ContextCache, ContextReader
from events.cache_memory import MemoryContextCache
from events.cache_redis import RedisContextCache
from events.context import fold
from events.postgres import PostgresEventStore
from events.secrets import Cipher
from events.store import NewEvent, StreamAppend

CIPHER = Cipher(Fernet.generate_key())
BODY = '{"products": [{"id": 3, "name": "mug", "price": 12.5, "stock": 40}], "count": 1}' * 3


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
        ev.AssertionEvaluated(name, 1, "$.count", "gte", 1, 1, True),
    ]
    if n % 10 == 0:
        events.append(ev.AuthTokenUpdated(name, "auth.token", CIPHER.encrypt(f"jwt-{n}")))
    else:
        events.append(ev.VariableCaptured(name, f"product_{n}", n))
    events.append(ev.TestPassed(name, 1, 3.5))
    return events


def run_events(run_id: str, count: int) -> list[ev.Event]:
    tests = (count - 2) // 7
    plan = [ev.PlannedTest(f"test_{n}") for n in range(tests)]
    events: list[ev.Event] = [ev.RunStarted(run_id, "bench", "digest", plan)]
    n = 0
    while len(events) < count - 1:
        events.extend(test_events(f"test_{n}", n))
        n += 1
    del events[count - 1 :]
    events.append(ev.RunCompleted("passed", passed=n, failed=0, skipped=0, duration_ms=1.0))
    return events


async def record(store: PostgresEventStore, run_id: str, events: list[ev.Event]) -> None:
    stream = ev.run_stream(run_id)
    for start in range(0, len(events), 1000):
        chunk = [NewEvent(event) for event in events[start : start + 1000]]
        await store.append([StreamAppend(stream, chunk, expected_version=start)])


async def timed(action: Callable[[], Awaitable[object]], times: int) -> list[float]:
    for _ in range(min(times, 20)):  # warm-up: connections, caches, the JIT-less first calls
        await action()
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)

    def rank(p: float) -> float:  # nearest rank
        return ordered[max(0, min(len(ordered) - 1, round(p * len(ordered)) - 1))]

    return rank(0.50), rank(0.99)


def row(label: str, samples: list[float]) -> str:
    p50, p99 = percentiles(samples)
    return f"| {label} | {len(samples)} | {p50:.3f} | {p99:.3f} |"


async def bench(pg_admin: str, redis_url: str, hits: int, folds: int, size: int) -> None:
    database = f"baton_bench_{secrets.token_hex(6)}"
    prefix = f"baton-bench-{secrets.token_hex(6)}:"
    admin = await asyncpg.connect(pg_admin)
    await admin.execute(f'CREATE DATABASE "{database}"')
    store = await PostgresEventStore.connect(f"{pg_admin.rpartition('/')[0]}/{database}")
    redis_cache = RedisContextCache.from_url(redis_url, prefix=prefix)
    memory_cache = MemoryContextCache()
    rows = ["| measure | n | p50 ms | p99 ms |", "|---|---|---|---|"]
    try:
        small, big = "small-run", "big-run"
        await record(store, small, run_events(small, 60))
        await record(store, big, run_events(big, size))
        stream = ev.run_stream(big)
        caches: list[tuple[str, ContextCache]] = [("Redis", redis_cache), ("memory", memory_cache)]
        for name, cache in caches:
            reader = ContextReader(store, cache)
            for run_id, label in ((small, "60-event run"), (big, f"{size:,}-event run")):
                await reader.refresh(run_id)
                get_samples = await timed(partial(cache.get, run_id), hits)
                rows.append(row(f"hit, {name} `get`, {label}", get_samples))
                read_samples = await timed(partial(reader.context, run_id), hits)
                rows.append(row(f"hit, {name} reader (+ version query), {label}", read_samples))
        version_samples = await timed(lambda: store.stream_version(stream), hits)
        rows.append(row("the version query alone", version_samples))

        async def read_and_fold() -> None:
            fold(await store.read_stream(stream))

        rows.append(
            row(f"miss, read + decode + fold, {size:,} events", await timed(read_and_fold, folds))
        )
        reader = ContextReader(store, redis_cache)

        async def reader_miss() -> None:
            await redis_cache.delete(big)
            await reader.context(big)

        rows.append(
            row(f"miss, Redis reader (+ SET), {size:,} events", await timed(reader_miss, folds))
        )
        recorded = await store.read_stream(stream)

        async def fold_only() -> None:
            fold(recorded)

        fold_samples = await timed(fold_only, folds)
        rows.append(row(f"fold alone (events in memory), {size:,} events", fold_samples))
    finally:
        await redis_cache.aclose()
        await store.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        client = Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--hits", type=int, default=5000)
    parser.add_argument("--folds", type=int, default=50)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(bench(args.pg, args.redis, args.hits, args.folds, args.events))


if __name__ == "__main__":
    main()
