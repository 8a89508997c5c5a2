"""Follow one run through Supabase Realtime (``baton watch RUN_ID --supabase``).

For users whose PostgreSQL is Supabase's: schema.sql adds ``test_runs`` and
``test_results`` to the ``supabase_realtime`` publication, and this adapter subscribes,
with the ``supabase`` package's realtime client, to the changes of one run's rows
(``postgres_changes`` on both tables, filtered by the run's id) and to the broadcast
channel ``run:<run_id>``. Each change reaches the caller as a plain dict (see
context_service.supabase_changes for the keys).

Realtime only delivers what happens after a subscription is ready and never replays, so
every subscription (the first, and each one after a lost connection) is followed by a
read of the run's rows through PostgREST: a run that ended already, or a change made
while the connection was down, is still seen. Rows seen twice that way are dropped, and
so is a change older than one already shown (a status never moves backwards). The
projector writes ``test_runs`` before ``test_results`` in one transaction, so the run's
final update arrives before its last results: the watch reads the results once more
then, reports them, and ends with the run's final line.

The key's role must be able to read both tables: Realtime and PostgREST apply row-level
security, and Baton's policies (schema step 4) let only the table owner or a role with
``baton.organization_id`` set see rows, so use the service_role key (it bypasses RLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from context_service.supabase_changes import (
    Change,
    Tracker,
    broadcast_change,
    format_change,
    rank,
    result_change,
    run_change,
)
from events.settings import mask_dsn
from orchestrator.errors import InfrastructureError

if TYPE_CHECKING:  # the supabase package takes ~0.4 s to import: only when watching
    import httpx
    from realtime import AsyncRealtimeChannel, RealtimeSubscribeStates
    from supabase import AsyncClient

__all__ = ["Change", "SupabaseWatchError", "format_change", "watch_supabase"]

_RUN_COLUMNS = (
    "id,status,total_tests,passed_tests,failed_tests,skipped_tests,duration_ms,cancel_reason"
)
_RESULT_COLUMNS = (
    "run_id,test_name,status,attempts,duration_ms,response_status,category,message,"
    "started_at,ended_at"
)
_Queue = asyncio.Queue[tuple["_Session | None", str, Any]]


class SupabaseWatchError(InfrastructureError):
    """The watch cannot go on: no connection, a refused key or join, a lost server, a
    run that does not exist. The message names the URL, never the key."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"Supabase at {url}: {reason}")


class _Fatal(Exception):
    """A failure that retrying will not mend (a refused key, join or query)."""


async def watch_supabase(
    url: str,
    key: str,
    run_id: str,
    on_change: Callable[[Change], None],
    *,
    stop: asyncio.Event | None = None,
    timeout_s: float = 10.0,
    reconnects: int = 3,
    backoff: float = 0.5,
    schema: str = "public",
) -> None:
    """Call ``on_change`` for each change of run ``run_id`` until the run's status is
    final (then return), or until ``stop`` is set.

    ``url`` is the project's URL (``https://<ref>.supabase.co``) and ``key`` its API key.
    ``timeout_s`` bounds connecting, joining and each read, and how long to wait for a run
    that is not there yet. A connection lost mid-watch is opened again up to
    ``reconnects`` times in a row, ``backoff`` seconds apart and doubling. Raises
    SupabaseWatchError; ValueError when ``run_id`` is not a UUID.
    """
    run_id = str(uuid.UUID(run_id))  # also keeps the filters free of injected operators
    where = mask_dsn(url.rstrip("/"))
    queue: _Queue = asyncio.Queue()
    tracker = Tracker(on_change)
    stopper = None
    if stop is not None:
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: queue.put_nowait((None, "stop", None)))
    failures = 0
    try:
        while stop is None or not stop.is_set():
            session = _Session(url, key, run_id, schema, timeout_s, queue)
            try:
                try:
                    await session.open()
                    rows = await session.read()
                except _Fatal as exc:
                    raise SupabaseWatchError(where, _scrub(str(exc), key)) from None
                except Exception as exc:
                    reason = _scrub(_describe(exc), key)
                    if not tracker.started:
                        raise SupabaseWatchError(where, f"cannot connect: {reason}") from None
                    failures += 1
                    if failures > reconnects:
                        raise SupabaseWatchError(
                            where, f"lost the connection and could not reconnect: {reason}"
                        ) from None
                    if await _stopped_within(stop, backoff * 2 ** (failures - 1)):
                        return
                    continue
                failures = 0
                if tracker.snapshot(*rows):
                    return
                if await _follow(session, queue, tracker, where, timeout_s):
                    return
                # the connection was lost: open it again and read what was missed
            finally:
                await session.close()
    finally:
        if stopper is not None:
            stopper.cancel()


async def _stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile: whether it was."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _follow(
    session: _Session, queue: _Queue, tracker: Tracker, where: str, timeout_s: float
) -> bool:
    """Hand on the changes of one subscription: True when the watch is over, False when
    the connection was lost."""
    loop = asyncio.get_running_loop()
    # a run may not be projected yet when its watch starts: give its INSERT some time
    give_up = None if tracker.run_seen else loop.time() + timeout_s
    while True:
        wait = None if tracker.run_seen or give_up is None else max(0.0, give_up - loop.time())
        try:
            owner, kind, item = await asyncio.wait_for(queue.get(), wait)
        except TimeoutError:
            raise SupabaseWatchError(
                where,
                f"run {session.run_id} not found: no row in test_runs that this key may read "
                f"(a wrong id, or a role that row-level security keeps from it)",
            ) from None
        if kind == "stop":
            return True
        if owner is not session:
            continue  # a late callback of a session that is closed
        if kind == "lost":
            return False
        if item["kind"] == "run" and item["final"]:
            # the rest of its transaction (the last results) arrives after it: read them
            try:
                _, results = await session.read()
            except Exception:
                results = []  # the run is over; its line still carries the counts
            tracker.finish(item, results)
            return True
        tracker.offer(item)


class _Session:
    """One supabase client, its channel, and the reads that follow each subscription."""

    def __init__(
        self,
        url: str,
        key: str,
        run_id: str,
        schema: str,
        timeout: float,
        queue: _Queue,
    ) -> None:
        self._url = url
        self._key = key
        self.run_id = run_id
        self._schema = schema
        self._timeout = timeout
        self._queue = queue
        self._client: AsyncClient | None = None
        self._channel: AsyncRealtimeChannel | None = None
        self._ready: asyncio.Future[None] | None = None
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        import httpx
        from realtime import RealtimePostgresChangesListenEvent
        from supabase import AsyncClient, AsyncClientOptions, SupabaseException
        from websockets.exceptions import InvalidStatus

        self._http = httpx.AsyncClient(timeout=self._timeout)
        options = AsyncClientOptions(
            schema=self._schema,
            # this adapter reconnects itself, so that it can read what it missed
            realtime={"auto_reconnect": False, "max_retries": 1},
            httpx_client=self._http,
            postgrest_client_retry=False,
        )
        try:
            self._client = client = AsyncClient(self._url, self._key, options)
        except SupabaseException as exc:
            raise _Fatal(f"not a Supabase project URL ({exc.message})") from None
        client.realtime.timeout = self._timeout  # type: ignore[assignment]  # a float works
        self._ready = asyncio.get_running_loop().create_future()
        channel = client.channel(f"run:{self.run_id}")
        every = RealtimePostgresChangesListenEvent.All
        channel.on_postgres_changes(
            every, self._on_row, table="test_runs", schema=self._schema,
            filter=f"id=eq.{self.run_id}",
        )  # fmt: skip
        channel.on_postgres_changes(
            every, self._on_row, table="test_results", schema=self._schema,
            filter=f"run_id=eq.{self.run_id}",
        )  # fmt: skip
        channel.on_broadcast("*", self._on_broadcast)
        channel.on_system(self._on_system)
        self._channel = channel
        try:
            await asyncio.wait_for(client.realtime.connect(), self._timeout)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _Fatal(f"Realtime refused the API key (HTTP {status})") from None
            raise
        # The client's listening task ends silently when a callback or the client itself
        # raises (websockets 15 warns on a close code attribute the client reads: under -W
        # error that is an exception); without this the watch would wait forever.
        listener: asyncio.Task[None] | None = getattr(client.realtime, "_listen_task", None)
        if listener is not None:
            listener.add_done_callback(self._on_listener_done)
        await channel.subscribe(self._on_state)
        # SUBSCRIBED comes before the server listens to PostgreSQL; its system message
        # "Subscribed to PostgreSQL" says when changes start to flow
        await asyncio.wait_for(asyncio.shield(self._ready), self._timeout)

    async def read(self) -> tuple[Change | None, list[Change]]:
        """The run's row and its results as they are now, through PostgREST."""
        from postgrest import APIError

        assert self._client is not None
        rest = self._client.postgrest
        try:
            runs = await (
                rest.from_("test_runs").select(_RUN_COLUMNS).eq("id", self.run_id).execute()
            )
            results = await (
                rest.from_("test_results")
                .select(_RESULT_COLUMNS)
                .eq("run_id", self.run_id)
                .execute()
            )
        except APIError as exc:
            raise _Fatal(f"PostgREST refused to read the run: {exc.message or exc}") from None
        run_rows = [row for row in runs.data if isinstance(row, dict)]
        result_rows = [row for row in results.data if isinstance(row, dict)]
        run = run_change(run_rows[0], "snapshot", None) if run_rows else None
        # finished tests in the order they ended, then running ones, then pending ones
        rows = sorted(
            result_rows,
            key=lambda r: (
                -rank(r["status"]),
                r.get("ended_at") or r.get("started_at") or "",
                r["test_name"],
            ),
        )
        return run, [result_change(row, "snapshot", None) for row in rows]

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.rejoin_timer.reset()
            self._channel.join_push.destroy()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.realtime.close()
        if self._http is not None:
            await self._http.aclose()  # the PostgREST client's: it was given ours

    # realtime callbacks: they run in the client's listening task

    def _on_state(self, state: RealtimeSubscribeStates, error: Exception | None) -> None:
        from websockets.exceptions import ConnectionClosed

        if state == "SUBSCRIBED":
            return
        if self._ready is not None and not self._ready.done():
            # a dropped connection is worth another try; a refused join is not
            if state == "TIMED_OUT":
                self._ready.set_exception(TimeoutError(_join_reason(state.value, error)))
            elif isinstance(error, ConnectionClosed):
                self._ready.set_exception(error)
            else:
                self._ready.set_exception(_Fatal(_join_reason(state.value, error)))
        else:
            self._queue.put_nowait((self, "lost", _join_reason(state.value, error)))

    def _on_listener_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        reason = "the Realtime client stopped listening"
        if error is not None:
            reason += f" ({_describe(error)})"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError(reason))
        else:
            self._queue.put_nowait((self, "lost", reason))

    def _on_system(self, payload: Any) -> None:
        if payload.extension == "postgres_changes" and self._ready and not self._ready.done():
            self._ready.set_result(None)

    def _on_row(self, payload: Any) -> None:
        data = payload["data"]
        record = data.get("record") or {}
        kind = getattr(data["type"], "value", data["type"])  # an enum member once parsed
        if kind == "DELETE" or not record:
            return
        at = data.get("commit_timestamp")
        if data["table"] == "test_runs" and str(record.get("id")) == self.run_id:
            self._queue.put_nowait((self, "change", run_change(record, kind, at)))
        elif data["table"] == "test_results" and str(record.get("run_id")) == self.run_id:
            self._queue.put_nowait((self, "change", result_change(record, kind, at)))

    def _on_broadcast(self, payload: Any) -> None:
        change = broadcast_change(self.run_id, payload.get("event"), payload.get("payload"))
        self._queue.put_nowait((self, "change", change))


def _join_reason(state: str, error: Exception | None) -> str:
    if state == "TIMED_OUT":
        return "the Realtime server did not answer the join in time"
    text = str(error) if error is not None else state
    with contextlib.suppress(ValueError, AttributeError):
        payload = json.loads(text)
        text = payload.get("reason") or payload.get("message") or text
    if state == "CLOSED":
        return f"the Realtime server closed the channel ({text})"
    return f"Realtime refused the subscription: {text}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    name = type(exc).__name__
    text = str(exc)
    return f"{name}: {text}" if text else name


def _scrub(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text
