"""JSON Schemas generated from the msgspec models, so they cannot say other than the code:
the flow file's (editors complete and check flows with it) and the event stream's (what
``baton run --events ndjson`` and the service's streams carry). docs/ holds the committed
copies; ``baton schema flow|events`` prints them, and a test compares the two."""

from __future__ import annotations

from typing import Any

import msgspec

from events.wire import WIRE_VERSION, Frame
from orchestrator.model import Flow

DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("flow", "events")


def flow_schema() -> dict[str, Any]:
    """The flow file as the loader reads it."""
    schema = msgspec.json.schema(Flow)
    return {
        "$schema": DIALECT,
        "title": "Baton flow file",
        "description": "A flow file of Baton (docs/flow-format.md). Generated from "
        "orchestrator.model.Flow by `baton schema flow`.",
        **schema,
    }


def events_schema() -> dict[str, Any]:
    """One message of an event stream: an ndjson line, a WebSocket message of a run stream;
    its ``event`` alone is an SSE message's data."""
    schema = msgspec.json.schema(Frame)
    return {
        "$schema": DIALECT,
        "title": f"Baton event stream, version {WIRE_VERSION}",
        "description": "A line of `baton run --events ndjson` or a message of a run's "
        "WebSocket stream; `event` alone is an SSE message's data (docs/agents.md). "
        "Generated from events.types by `baton schema events`.",
        "version": WIRE_VERSION,
        **schema,
    }


def schema_text(kind: str) -> str:
    """The schema ``kind`` names as JSON text, as committed in docs/<kind>.schema.json."""
    made = flow_schema() if kind == "flow" else events_schema()
    return msgspec.json.format(msgspec.json.encode(made), indent=2).decode() + "\n"
