"""The event store, the context cache and the projector against the servers on the machine.

One run, one private database on the PostgreSQL server (created, dropped at the end) and
keys under a private prefix in Redis (deleted at the end). Events are shaped like a real
run's (cache_bench.py builds them): RunStarted, then per test TestStarted, RequestSent,
ResponseReceived (a 330-byte body excerpt), two AssertionEvaluated, VariableCaptured
(every tenth test an encrypted AuthTokenUpdated instead), TestPassed; RunCompleted last.
Measured (see STORE.md):

1. batched append: 100-event batches through ``store.append`` (runs of 1,000 events, each
   append expecting the stream's version, as the writer does), one client, sequential;
   beside it, in slices of 30 batches in a rotating order, the same rows into identical
   bare tables (``LIKE events INCLUDING ALL``) with plain asyncpg: INSERT ... SELECT
   unnest(...) and executemany of a one-row INSERT; the faster INSERT is the floor. COPY
   is measured too, for reference: it is no INSERT, and nothing that checks versions can
   use it.
2. single-event append latency, with a plain one-row INSERT interleaved as its floor.
3. context cache (in cache_bench.py): ``ContextReader.context`` on a hit (Redis) for a
   60-event run; a miss: ``fold(await store.read_stream(...))`` of a 10,000-event run
   (read, decode, fold).
4. projector lag: ``Projector.serve`` in a second process; appends of 10 events every
   10 ms (1,000 events/s). The projector's page handler notifies, inside the page's
   transaction, the last position it applied, so the notice arrives when the read tables
   commit; lag = its arrival minus the return of the append that wrote that position.

    python bench/store_bench.py [--pg DSN] [--redis URL] [--batches 300] [--singles 2000]
        [--hits 5000] [--folds 200] [--lag-seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from cache_bench import (
    cache,
    cpu_of,
    ms,
    private_database,
    run_events,
    store_backends,
)

from events import types as ev
from events.postgres import PostgresEventStore
from events.projections import Projector
from events.store import NewEvent, StreamAppend

APPLIED = "baton_bench_applied"
COLUMNS = ("stream", "version", "event_id", "type", "data")
Row = tuple[str, int, Any, str, str]


# ---- 1. batched append ---------------------------------------------------------------------


async def batched_append(store: PostgresEventStore, dsn: str, batches: int) -> dict[str, Any]:
    runs = max(1, batches // 10)
    work: list[tuple[str, int, list[NewEvent]]] = []
    for r in range(runs):
        stream = ev.run_stream(f"batched-{r}")
        events = [NewEvent(event) for event in run_events(f"batched-{r}", 1000)]
        work += [(stream, v, events[v : v + 100]) for v in range(0, 1000, 100)]
    work = work[:batches]
    # the bare rows: exactly what baton_append stores, encoded beforehand (untimed)
    rows: list[list[Row]] = [
        [
            (stream, start + i + 1, new.id, ev.event_type(new.event), ev.encode(new.event).decode())
            for i, new in enumerate(chunk)
        ]
        for stream, start, chunk in work
    ]
    plain = await asyncpg.connect(dsn)  # asyncpg's defaults: no Baton code on this one
    for table in ("bare_copy", "bare_unnest", "bare_executemany"):
        await plain.execute(f"CREATE TABLE {table} (LIKE events INCLUDING ALL)")
    insert = "INSERT INTO bare_executemany (stream, version, event_id, type, data)"
    unnest = (
        "INSERT INTO bare_unnest (stream, version, event_id, type, data) SELECT * FROM"
        " unnest($1::text[], $2::int[], $3::uuid[], $4::text[], $5::jsonb[])"
    )
    columns = [list(zip(*batch, strict=True)) for batch in rows]  # for unnest (untimed)

    async def baton(i: int) -> None:
        stream, start, chunk = work[i]
        await store.append([StreamAppend(stream, chunk, expected_version=start)])

    async def copy(i: int) -> None:
        await plain.copy_records_to_table("bare_copy", records=rows[i], columns=COLUMNS)

    async def unnest_insert(i: int) -> None:
        await plain.execute(unnest, *columns[i])

    async def executemany(i: int) -> None:
        await plain.executemany(f"{insert} VALUES ($1, $2, $3, $4, $5)", rows[i])

    contenders: dict[str, Callable[[int], Awaitable[None]]] = {
        "baton": baton,
        "copy": copy,
        "unnest": unnest_insert,
        "executemany": executemany,
    }
    wall = dict.fromkeys(contenders, 0.0)
    cpu = dict.fromkeys(contenders, 0.0)
    server = dict.fromkeys(contenders, 0.0)
    backends = {"baton": await store_backends(store, plain)}
    names = list(contenders)
    # 30 batches in a row per contender (its connection and caches warm, as for one
    # client), contenders in an order that rotates from slice to slice
    slices = [range(k, min(k + 30, len(work))) for k in range(0, len(work), 30)]
    for k, indices in enumerate(slices):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            pids = backends.get(name) or [plain.get_server_pid()]
            server_started = cpu_of(pids)
            started, cpu_started = time.perf_counter(), time.process_time()
            for i in indices:
                await contenders[name](i)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
            server[name] += cpu_of(pids) - server_started
    await plain.close()
    appended = sum(len(chunk) for _, _, chunk in work)
    rates = {name: appended / seconds for name, seconds in wall.items()}
    floor = max(("unnest", "executemany"), key=rates.__getitem__)
    return {
        "batches": len(work),
        "events": appended,
        "events_per_s": rates,
        "client_cpu_ms_per_batch": {n: c / len(work) * 1000 for n, c in cpu.items()},
        "server_cpu_ms_per_batch": {n: c / len(work) * 1000 for n, c in server.items()},
        "floor": floor,
        "ratio": rates["baton"] / rates[floor],
    }


# ---- 2. single-event append -----------------------------------------------------------------


async def single_append(store: PostgresEventStore, dsn: str, count: int) -> dict[str, Any]:
    stream = ev.run_stream("single")
    events = [NewEvent(event) for event in run_events("single", count + 20)]
    plain = await asyncpg.connect(dsn)
    await plain.execute("CREATE TABLE bare_single (LIKE events INCLUDING ALL)")
    insert = (
        "INSERT INTO bare_single (stream, version, event_id, type, data)"
        " VALUES ($1, $2, $3, $4, $5)"
    )
    baton: list[float] = []
    bare: list[float] = []
    for version, new in enumerate(events):
        started = time.perf_counter()
        await store.append([StreamAppend(stream, [new], expected_version=version)])
        baton.append(time.perf_counter() - started)
        data = ev.encode(new.event).decode()
        started = time.perf_counter()
        await plain.execute(insert, stream, version + 1, new.id, ev.event_type(new.event), data)
        bare.append(time.perf_counter() - started)
    await plain.close()
    return {"baton": ms(baton[20:]), "bare_insert": ms(bare[20:])}  # first 20: warm-up


# ---- 4. projector lag -------------------------------------------------------------------------


async def serve_projector(dsn: str) -> None:
    """The second process: the projector, telling the bench what each page committed."""
    store = await PostgresEventStore.connect(dsn, max_size=4)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def notify(conn: asyncpg.Connection, page: Sequence[ev.RecordedEvent]) -> None:
        # delivered when (and only if) the page's transaction commits
        await conn.execute("SELECT pg_notify($1, $2)", APPLIED, f"{page[-1].position} {len(page)}")

    try:
        await Projector(store, handlers=[notify]).serve(stop=stop)
    finally:
        await store.aclose()


async def projector_lag(
    store: PostgresEventStore, dsn: str, seconds: float, rate: int, batch: int
) -> dict[str, Any]:
    listener = await asyncpg.connect(dsn)
    applied = 0
    pages: list[int] = []
    pending: collections.deque[tuple[int, float]] = collections.deque()
    lags: list[float] = []

    def on_applied(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        nonlocal applied
        arrived = time.perf_counter()
        position, size = map(int, payload.split())
        applied = max(applied, position)
        pages.append(size)
        while pending and pending[0][0] <= position:
            lags.append(arrived - pending.popleft()[1])

    await listener.add_listener(APPLIED, on_applied)
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve-projector", dsn)
    interval = batch / rate
    total = round(seconds * rate / batch)
    per_run = 100 // batch
    work: list[tuple[str, list[NewEvent], int]] = []
    for run in range(-(-total // per_run)):  # runs of 100 events, built beforehand
        events = [NewEvent(event) for event in run_events(f"lag-{run}", 100)]
        stream = ev.run_stream(f"lag-{run}")
        work += [(stream, events[v : v + batch], v) for v in range(0, 100, batch)]
    try:
        # the projector catches up with the earlier sections' events first
        log_head = await store.pool.fetchval("SELECT max(position) FROM events")
        deadline = time.monotonic() + 120
        while applied < log_head:
            if time.monotonic() > deadline or child.returncode is not None:
                raise RuntimeError("the projector did not catch up within 120 s")
            await asyncio.sleep(0.05)
        pages.clear()
        started = time.perf_counter()
        for i, (stream, chunk, version) in enumerate(work[:total]):
            delay = started + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            [positions] = await store.append([StreamAppend(stream, chunk, version)])
            committed = time.perf_counter()
            if positions[-1] <= applied:
                lags.append(0.0)  # the read tables had it before the append returned
            else:
                pending.append((positions[-1], committed))
        elapsed = time.perf_counter() - started
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:  # noqa: ASYNC110 (a deadline too)
            await asyncio.sleep(0.01)
    finally:
        child.send_signal(signal.SIGTERM)
        await child.wait()
        await listener.close()
    return {
        "events": total * batch,
        "achieved_events_per_s": total * batch / elapsed,
        "lag": ms(lags),
        "lost": len(pending),
        "pages": len(pages),
        "mean_page": sum(pages) / max(1, len(pages)),
    }


# ---- report -----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(r: dict[str, Any]) -> str:
    a, s, c, p = r["batched_append"], r["single_append"], r["cache"], r["projector"]
    rates = a["events_per_s"]
    hit = c["hit_reader"]
    lines = [
        f"{r['date']}, load average before/after: {r['load_before']} / {r['load_after']}",
        "",
        "| measure | result | target | verdict |",
        "|---|---|---|---|",
        f"| batched append, 100-event batches | {rates['baton']:,.0f} events/s | >= 50,000 "
        f"| {verdict(rates['baton'] >= 50_000)} |",
        f"| vs bare INSERT ({a['floor']}) of the same rows ({rates[a['floor']]:,.0f} rows/s) "
        f"| {a['ratio']:.0%} | >= 60% | {verdict(a['ratio'] >= 0.6)} |",
        f"| single-event append | p50 {s['baton']['p50']:.3f} ms, p99 {s['baton']['p99']:.3f} ms "
        f"| p99 < 2 ms | {verdict(s['baton']['p99'] < 2)} |",
        f"| cache hit (ContextReader, Redis, 60-event run) | p50 {hit['p50']:.3f} ms,"
        f" p99 {hit['p99']:.3f} ms | p99 < 1 ms | {verdict(hit['p99'] < 1)} |",
        f"| miss: read + decode + fold, 10,000 events | p50 {c['miss_fold']['p50']:.1f} ms,"
        f" p99 {c['miss_fold']['p99']:.1f} ms | < 50 ms (p99) "
        f"| {verdict(c['miss_fold']['p99'] < 50)} |",
        f"| projector lag at {p['achieved_events_per_s']:,.0f} events/s | p50 "
        f"{p['lag']['p50']:.1f} ms, p95 {p['lag']['p95']:.1f} ms, p99 {p['lag']['p99']:.1f} ms"
        f" | p95 < 100 ms | {verdict(p['lag']['p95'] < 100 and not p['lost'])} |",
        "",
        "| detail | n | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    details = [
        ("single append, bare one-row INSERT (floor)", s["bare_insert"]),
        ("cache hit, Redis GET + decode alone", c["hit_redis_get"]),
        ("cache hit, the stream-version query alone", c["version_query"]),
        ("miss, ContextReader (read, fold, SET)", c["miss_reader"]),
        ("miss, read_stream alone (10,000 events)", c["read_stream"]),
        ("miss, fold alone (events in memory)", c["fold_only"]),
    ]
    for label, m in details:
        lines.append(f"| {label} | {m['n']} | {m['p50']:.3f} | {m['p95']:.3f} | {m['p99']:.3f} |")
    cpu, server = a["client_cpu_ms_per_batch"], a["server_cpu_ms_per_batch"]
    fold_cpu = c["miss_fold_cpu_ms"]
    lines += [
        "",
        f"CPU per read + fold of 10,000 events: client {fold_cpu['client']:.1f} ms,"
        f" server {fold_cpu['server']:.1f} ms",
        "",
        "| 100-event batches, one client | events/s | client CPU ms/batch | server CPU ms/batch |",
        "|---|---|---|---|",
        *(f"| {n} | {rates[n]:,.0f} | {cpu[n]:.3f} | {server[n]:.3f} |" for n in rates),
        "",
        f"projector: {p['pages']} pages, {p['mean_page']:.1f} events per page,"
        f" {p['lost']} appends never seen applied",
    ]
    return "\n".join(lines)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    result["load_before"] = load()
    async with private_database(args.pg) as dsn:
        store = await PostgresEventStore.connect(dsn)
        try:
            result["batched_append"] = await batched_append(store, dsn, args.batches)
            result["single_append"] = await single_append(store, dsn, args.singles)
            result["cache"] = await cache(store, args.redis, args.hits, args.folds, args.events)
            result["projector"] = await projector_lag(store, dsn, args.lag_seconds, 1000, 10)
        finally:
            await store.aclose()
    result["load_after"] = load()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--redis", default=os.environ.get("BATON_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--singles", type=int, default=2000)
    parser.add_argument("--hits", type=int, default=5000)
    parser.add_argument("--folds", type=int, default=200)
    parser.add_argument("--events", type=int, default=10_000, help="size of the folded run")
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--serve-projector", metavar="DSN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_projector:
        asyncio.run(serve_projector(args.serve_projector))
        return
    result = asyncio.run(bench(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
