"""Reading back what runs recorded: ``baton context``, ``baton events``, ``baton runs``,
``baton show``, ``baton db``, ``baton projections``.

Contexts come through the context cache (Redis or in-process), which folds whatever the
log holds beyond what it cached. Run lists come from the read tables, brought up to date
first. Secret values are ciphertext in the log and are shown as ``***``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events import types as ev
from events.context import Context, context_at, redacted
from events.postgres import PostgresEventStore
from events.projections import project, rebuild
from events.projections.queries import RunFilter, RunRow, recent_runs, run_with_results
from events.secrets import masked_event
from events.settings import Settings
from orchestrator.errors import UsageError


async def context(
    store: PostgresEventStore, settings: Settings, run_id: str, position: int | None
) -> str:
    return _pretty(await context_data(store, settings, run_id, position))


async def context_data(
    store: PostgresEventStore, settings: Settings, run_id: str, position: int | None = None
) -> Any:
    """A run's context as plain data, secrets masked (``baton context``, the MCP server)."""
    from events.cache import CacheError, ContextReader, UnknownRun, open_cache

    if position is not None:
        return msgspec.to_builtins(redacted(await _context_at(store, run_id, position)))
    try:
        cache = open_cache(settings)
    except CacheError as exc:
        raise UsageError(f"BATON_REDIS_URL: {exc}") from None
    try:
        state = await ContextReader(store, cache).context(run_id)
    except UnknownRun:
        raise _unknown(run_id) from None
    finally:
        await cache.aclose()
    return msgspec.to_builtins(redacted(state))


async def _context_at(store: PostgresEventStore, run_id: str, position: int) -> Context:
    """Time travel folds from the log, never from the cache. A position outside the run's
    events (a negative one, or a version within the run taken for a position) would fold
    to an empty or a final context that answers nothing: it is refused with the range."""
    recorded = await store.read_stream(ev.run_stream(run_id))
    if not recorded:
        raise _unknown(run_id)
    first, last = recorded[0].position, recorded[-1].position
    if not first <= position <= last:
        raise UsageError(
            f"--at {position} is outside run {run_id}: its events are at log positions "
            f"{first} to {last} (the first column of `baton events`)"
        )
    return context_at(recorded, position)


def _unknown(run_id: str) -> UsageError:
    return UsageError(f"no run {run_id!r} in the event store (see `baton runs`)")


async def event_log(store: PostgresEventStore, run_id: str) -> str:
    recorded = await store.read_stream(ev.run_stream(run_id))
    if not recorded:
        raise _unknown(run_id)
    # the position is the log's (what --at takes), the version the event's number in the run
    lines = [f"{'position':>8} {'version':>7} {'time':<12} {'type':<18} fields"]
    for item in recorded:
        time = item.recorded_at.strftime("%H:%M:%S.%f")[:-3]
        # a secret capture's ciphertext is masked, as the API's and the streams' are
        payload = msgspec.to_builtins(masked_event(item.event))
        stamp = f"{item.version:>7} {time}"
        lines.append(format_event(item.position, item.type, payload, stamp=stamp))
    return "\n".join(lines)


def format_event(position: int, kind: str, payload: dict[str, Any], *, stamp: str = "") -> str:
    """One line of an event: position, (version and time), type, its fields compacted."""
    detail = " ".join(f"{key}={_compact(value)}" for key, value in payload.items() if key != "type")
    return " ".join(part for part in (f"{position:>8}", stamp, f"{kind:<18}", detail) if part)


async def runs(store: PostgresEventStore, where: RunFilter) -> str:
    await project(store)
    rows = await recent_runs(store, where)
    if not rows:
        return "no runs match" if where != RunFilter(limit=where.limit) else "no runs yet"
    header = f"{'run id':<36}  {'status':<9} {'passed':>6} {'failed':>6} {'skipped':>7}  "
    lines = [header + f"{'started':<19}  {'env':<10} suite"]
    lines += [_run_line(row) for row in rows]
    return "\n".join(lines)


async def show(store: PostgresEventStore, run_id: str) -> str:
    await project(store)
    found = await run_with_results(store, run_id)
    if found is None:
        raise UsageError(f"no run {run_id!r} in the read tables (see `baton runs`)")
    run, results = found
    ended = run.status != "running"
    status = run.status + (f" ({run.cancel_reason})" if run.cancel_reason else "")
    # a cancelled run's unfinished tests: stopped in flight, or never started
    cancelled = run.total - run.passed - run.failed - run.skipped if ended else 0
    tally = f"{run.passed} passed, {run.failed} failed, {run.skipped} skipped"
    tally += f", {cancelled} cancelled" if cancelled else ""
    lines = [
        f"run {run.run_id}: {run.suite}" + (f" [row {run.batch_row}]" if run.batch_row else ""),
        f"  status {status}, {tally} of {run.total}, {_took(run)}",
        f"  environment {run.environment}, started {run.started_at:%Y-%m-%d %H:%M:%S %Z}",
    ]
    stream = ev.run_stream(run.run_id)
    first = (await store.first_events([stream])).get(stream)
    if first is not None and isinstance(first.event, ev.RunStarted):
        if first.event.batch_id:
            # the id `baton rerun BATCH_ID --failed-rows` takes; no other output names it
            lines.append(f"  batch {first.event.batch_id}, row {first.event.row}")
        if first.event.continues:
            lines.append(f"  continues run {first.event.continues}")
    lines.append("")
    for result in results:
        timing = f"{result.duration_ms:.0f} ms" if result.duration_ms is not None else ""
        shown = "cancelled" if ended and result.status in ("pending", "running") else result.status
        code = f"HTTP {result.response_status}" if result.response_status else ""
        line = f"  {shown:<9} {result.test:<28} {timing:>9}  {code}"
        if result.category:
            line += f"  [{result.category}] {result.message}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _took(run: RunRow) -> str:
    if run.duration_ms is not None:
        return f"{run.duration_ms / 1000:.2f} s"
    if run.ended_at is not None:  # cancelled: no RunCompleted, no duration of its own
        return f"ended after {(run.ended_at - run.started_at).total_seconds():.2f} s"
    return "running"


async def migrate(dsn: str) -> str:
    from events.migrations import migrate as apply
    from events.migrations import schema_status

    applied = await apply(dsn)
    status = await schema_status(dsn)
    if not applied:
        return f"schema up to date at step {status.current}"
    return "\n".join(
        [
            *(f"applied step {step.number}: {step.name}" for step in applied),
            f"schema at step {status.current}",
        ]
    )


async def db_status(dsn: str) -> str:
    from events.migrations import schema_status

    status = await schema_status(dsn)
    lines = [f"schema at step {status.current} of {status.latest}"]
    names = [step.name for step in status.applied] + [step.name for step in status.pending]
    width = max(map(len, names), default=0)
    lines += [
        f"  {step.number:>3} {step.name:<{width}}  applied {step.applied_at:%Y-%m-%d %H:%M:%S}"
        for step in status.applied
    ]
    lines += [f"  {step.number:>3} {step.name:<{width}}  pending" for step in status.pending]
    return "\n".join(lines)


async def rebuild_projections(store: PostgresEventStore) -> str:
    applied = await rebuild(store)
    return f"read tables rebuilt from {applied} events"


def _run_line(row: RunRow) -> str:
    suite = row.suite + (f" [row {row.batch_row}]" if row.batch_row else "")
    return (
        f"{row.run_id:<36}  {row.status:<9} {row.passed:>6} {row.failed:>6} {row.skipped:>7}  "
        f"{row.started_at:%Y-%m-%d %H:%M:%S}  {row.environment:<10} {suite}"
    )


def _compact(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pretty(data: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()
