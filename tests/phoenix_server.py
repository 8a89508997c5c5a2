"""A small stand-in for a Supabase project on 127.0.0.1, for the Realtime adapter's tests.

Supabase's own server cannot run here, so this speaks what the ``supabase`` package's
clients need of it, in the shapes Supabase sends (checked against the realtime client's
message models and the Realtime server's own channel tests):

- Realtime at ``/realtime/v1/websocket`` (Phoenix channels, JSON serializer 1.0.0): a
  ``phx_join`` with ``postgres_changes`` bindings gets a ``phx_reply`` ok that echoes each
  binding with a server id, then ``presence_state``, then the ``system`` message
  "Subscribed to PostgreSQL"; heartbeats and ``phx_leave`` get a ``phx_reply`` ok. Rows
  written with ``insert``/``update`` reach each subscriber whose binding matches (table,
  event, an ``eq`` filter) as ``postgres_changes`` messages; ``broadcast`` sends to a topic.
- PostgREST at ``/rest/v1/<table>``: GET with ``select`` and ``col=eq.value`` filters over
  the same in-memory rows.
- The API gateway's key check: a wrong ``apikey`` gets HTTP 401 on both.

Everything a client sends over the socket is kept in ``received``, every REST request in
``rest_requests``, so a test can assert what the adapter asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

Row = dict[str, Any]


class _Subscription:
    def __init__(self, conn: ServerConnection, topic: str, bindings: list[Row]) -> None:
        self.conn = conn
        self.topic = topic
        self.bindings = bindings


class PhoenixServer:
    """Start with ``await server.start()`` (or ``async with``); ``url`` is then the project URL."""

    def __init__(self, key: str = "test-anon-key") -> None:
        self.key = key
        self.url = ""
        self.received: list[Row] = []
        self.rest_requests: list[tuple[str, dict[str, str]]] = []
        self.tables: dict[str, dict[str, Row]] = {"test_runs": {}, "test_results": {}}
        self.refuse_joins: str | None = None
        """When set, every join is answered with an error with this reason."""
        self.postgres_error: str | None = None
        """When set, joins succeed but the postgres_changes system message is an error."""
        self.joins_open = asyncio.Event()
        """While cleared, joins wait for an answer (a slow or silent server)."""
        self.joins_open.set()
        self.ready = 0
        """How many subscriptions were told "Subscribed to PostgreSQL"."""
        self._subscriptions: list[_Subscription] = []
        self._connections: set[ServerConnection] = set()
        self._server: Server | None = None
        self._progress = asyncio.Event()

    async def start(self) -> None:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._process_request
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Close every connection and stop listening: the server is gone."""
        self.joins_open.set()  # lets waiting handlers finish, or closing would wait for them
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop_connections(self) -> None:
        """Close every client's socket abnormally, as a network failure would; keep serving."""
        for conn in list(self._connections):
            await conn.close(1011, "dropped by the test")
        self._subscriptions.clear()

    async def __aenter__(self) -> PhoenixServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what a test does -------------------------------------------------------------

    async def insert(self, table: str, row: Row) -> None:
        self.tables[table][str(row["id"])] = dict(row)
        await self._publish(table, "INSERT", dict(row), None)

    async def update(self, table: str, row_id: object, **changes: Any) -> None:
        row = self.tables[table][str(row_id)]
        row.update(changes)
        # default replica identity: the old record carries the primary key only
        await self._publish(table, "UPDATE", dict(row), {"id": row["id"]})

    async def broadcast(self, topic: str, event: str, payload: Row) -> None:
        message = {"event": event, "payload": payload, "type": "broadcast"}
        for sub in list(self._subscriptions):
            if sub.topic == f"realtime:{topic}":
                await self._send(sub.conn, sub.topic, "broadcast", message)

    def joins(self) -> list[Row]:
        return [m for m in self.received if m.get("event") == "phx_join"]

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Until ``predicate()`` holds, checked after each message, request or join."""
        async with asyncio.timeout(within):
            while not predicate():
                self._progress.clear()
                await self._progress.wait()

    # ---- Realtime ---------------------------------------------------------------------

    async def _handle(self, conn: ServerConnection) -> None:
        self._connections.add(conn)
        try:
            async for raw in conn:
                message = json.loads(raw)
                self.received.append(message)
                self._progress.set()
                await self._dispatch(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(conn)
            self._subscriptions = [s for s in self._subscriptions if s.conn is not conn]

    async def _dispatch(self, conn: ServerConnection, message: Row) -> None:
        topic, event, ref = message["topic"], message["event"], message.get("ref")
        if event == "heartbeat" or event == "phx_leave":
            self._subscriptions = [
                s for s in self._subscriptions if not (s.conn is conn and s.topic == topic)
            ]
            await self._reply(conn, topic, ref, "ok", {})
        elif event == "phx_join":
            await self._join(conn, topic, ref, message["payload"])

    async def _join(
        self, conn: ServerConnection, topic: str, ref: str | None, payload: Row
    ) -> None:
        await self.joins_open.wait()
        if self.refuse_joins is not None:
            await self._reply(conn, topic, ref, "error", {"reason": self.refuse_joins})
            return
        bindings = [
            {**binding, "id": zlib.crc32(json.dumps(binding, sort_keys=True).encode())}
            for binding in payload.get("config", {}).get("postgres_changes", [])
        ]
        await self._reply(conn, topic, ref, "ok", {"postgres_changes": bindings})
        await self._send(conn, topic, "presence_state", {})
        status = "error" if self.postgres_error else "ok"
        system = {
            "channel": topic.removeprefix("realtime:"),
            "extension": "postgres_changes",
            "message": self.postgres_error or "Subscribed to PostgreSQL",
            "status": status,
        }
        if status == "ok":
            self._subscriptions.append(_Subscription(conn, topic, bindings))
        await self._send(conn, topic, "system", system)
        if status == "ok":
            self.ready += 1
        self._progress.set()

    async def _publish(self, table: str, kind: str, record: Row, old: Row | None) -> None:
        data: Row = {
            "schema": "public",
            "table": table,
            "commit_timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "type": kind,
            "errors": None,
            "columns": [{"name": name, "type": _pg_type(v)} for name, v in record.items()],
            "record": record,
        }
        if old is not None:
            data["old_record"] = old
        for sub in list(self._subscriptions):
            ids = [b["id"] for b in sub.bindings if _matches(b, table, kind, record)]
            if ids:
                await self._send(
                    sub.conn, sub.topic, "postgres_changes", {"ids": ids, "data": data}
                )

    async def _reply(
        self, conn: ServerConnection, topic: str, ref: str | None, status: str, response: Row
    ) -> None:
        payload = {"status": status, "response": response}
        await self._send(conn, topic, "phx_reply", payload, ref)

    async def _send(
        self, conn: ServerConnection, topic: str, event: str, payload: Row, ref: str | None = None
    ) -> None:
        message = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        with contextlib.suppress(ConnectionClosed):  # the client is gone: as a server would
            await conn.send(json.dumps(message))

    # ---- the API gateway and PostgREST ------------------------------------------------

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = dict(parse_qsl(parts.query))
        if parts.path == "/realtime/v1/websocket":
            if query.get("apikey") != self.key:
                return _json(HTTPStatus.UNAUTHORIZED, {"message": "Invalid API key"})
            return None
        if request.headers.get("apikey") != self.key:
            return _json(HTTPStatus.UNAUTHORIZED, {"message": "Invalid API key"})
        table = parts.path.removeprefix("/rest/v1/")
        if not parts.path.startswith("/rest/v1/") or table not in self.tables:
            return _json(HTTPStatus.NOT_FOUND, {"message": f"no table {table}", "code": "42P01"})
        self.rest_requests.append((table, dict(query)))
        self._progress.set()
        columns = [c for c in query.pop("select", "*").split(",") if c != "*"]
        rows = [
            row
            for row in self.tables[table].values()
            if all(_filter(row, column, value) for column, value in query.items())
        ]
        if columns:
            rows = [{c: row.get(c) for c in columns} for row in rows]
        return _json(HTTPStatus.OK, rows)


def _matches(binding: Row, table: str, kind: str, record: Row) -> bool:
    if binding.get("table") not in (None, "*", table) or binding.get("event") not in ("*", kind):
        return False
    spec = binding.get("filter")
    if not spec:
        return True
    column, _, condition = spec.partition("=")
    return _filter(record, column, condition)


def _filter(row: Row, column: str, condition: str) -> bool:
    operator, _, value = condition.partition(".")
    if operator != "eq":
        raise ValueError(f"the test server knows only eq filters, not {condition!r}")
    return str(row.get(column)) == value


def _pg_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int4"
    if isinstance(value, float):
        return "float8"
    return "text"


def _json(status: HTTPStatus, body: object) -> Response:
    data = json.dumps(body).encode()
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)
