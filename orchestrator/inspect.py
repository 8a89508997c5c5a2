"""Reading back what runs recorded: ``baton context``, ``baton events``, ``baton runs``.

Everything shown here comes from the event log; secret values are ciphertext there and
are shown as ``***``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events import types as ev
from events.context import context_at, fold, redacted
from events.store import EventStore
from orchestrator.errors import UsageError


async def _run_events(store: EventStore, run_id: str) -> list[ev.RecordedEvent]:
    recorded = await store.read_stream(ev.run_stream(run_id))
    if not recorded:
        raise UsageError(f"no run {run_id!r} in the event store (see `baton runs`)")
    return recorded


async def context(store: EventStore, run_id: str, position: int | None) -> str:
    recorded = await _run_events(store, run_id)
    state = fold(recorded) if position is None else context_at(recorded, position)
    return _pretty(msgspec.to_builtins(redacted(state)))


async def event_log(store: EventStore, run_id: str) -> str:
    lines = []
    for item in await _run_events(store, run_id):
        payload = msgspec.to_builtins(item.event)
        payload.pop("type", None)
        detail = " ".join(f"{key}={_compact(value)}" for key, value in payload.items())
        time = item.recorded_at.strftime("%H:%M:%S.%f")[:-3]
        lines.append(f"{item.position:>8} {item.version:>4} {time} {item.type:<18} {detail}")
    return "\n".join(lines)


async def recent_runs(store: EventStore, limit: int) -> str:
    streams = await store.list_streams("run-", limit)
    if not streams:
        return "no runs yet"
    lines = [f"{'run id':<36}  {'status':<9} {'tests':>5}  {'started':<19}  suite"]
    for stream in streams:
        recorded = await store.read_stream(stream)
        state = fold(recorded)
        started = recorded[0].recorded_at.strftime("%Y-%m-%d %H:%M:%S") if recorded else ""
        lines.append(
            f"{state.run_id:<36}  {state.status:<9} {len(state.statuses):>5}  {started:<19}  "
            f"{state.suite}"
        )
    return "\n".join(lines)


def _compact(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pretty(data: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()
