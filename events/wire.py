"""How an event is shown outside the runner: one encoding for the SSE and WebSocket streams
of the service and for ``baton run --events ndjson``, so a consumer parses them alike.

``event_data`` is an SSE message's ``data:`` (the event as JSON, ``type`` its tag, secret
captures masked). ``frame`` wraps it as a WebSocket message of a run stream, and, with the
run's id, as an ndjson line. ``WIRE_VERSION`` is the version of that shape, stated in
docs/events.schema.json: it changes only when a field changes meaning or is removed (a new
event type or field with a default does not change it).
"""

from __future__ import annotations

import msgspec

from events.secrets import masked_event
from events.types import Event, encode, event_type

WIRE_VERSION = 1


class Frame(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ``frame`` writes, for its JSON Schema (docs/events.schema.json)."""

    type: str
    """The event's type: its ``type`` tag."""
    event: Event
    run_id: str | msgspec.UnsetType = msgspec.UNSET
    """The run whose stream holds it (ndjson lines)."""
    position: int | msgspec.UnsetType = msgspec.UNSET
    """Its position in the log (WebSocket messages, read back from the store)."""


def event_data(event: Event) -> bytes:
    """The event as anyone but the runner sees it, as JSON."""
    return encode(masked_event(event))


def frame(position: int | None, kind: str, data: bytes, *, run_id: str | None = None) -> bytes:
    """``{"position", "type", "event"}`` (and ``run_id`` when given) around ``data``, an
    ``event_data``; no position for an event not read back from the log."""
    head = b'{"run_id":%s,' % msgspec.json.encode(run_id) if run_id is not None else b"{"
    where = b'"position":%d,' % position if position is not None else b""
    return b'%s%s"type":"%s","event":%s}' % (head, where, kind.encode(), data)


def ndjson_line(run_id: str, event: Event, position: int) -> bytes:
    """One line of ``baton run --events ndjson`` (newline included)."""
    return frame(position, event_type(event), event_data(event), run_id=run_id) + b"\n"
