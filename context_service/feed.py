"""The realtime feed of one service process: a doorbell, a window of recent events, cursors.

The event store is what replays; the doorbell only says that something was committed. One
``Hub`` per app holds a single subscription to the log (``EventStore.subscribe``: woken at
each commit, read by position, never passing over an event a slower transaction commits
later), in one task that runs while someone follows. What it reads joins a window of recent
events, each encoded once (secrets masked) for every subscriber.

A subscriber is a cursor: the position of the last event it was given. ``follow`` serves
it from the window while its cursor is inside the window, and from the store otherwise (a
subscriber that connects mid-run, reconnects with Last-Event-ID, or fell so far behind
that the window moved on). Either way it gets every event after its cursor once, in order:
no gap and no duplicate, whether a notice came from this process or another instance.

A project's feed is the run-level events of its runs (the project comes from each run's
RunStarted) and the findings of its ``analytics-<project id>`` stream (FlakyTestDetected,
PerformanceDegraded, which the Detector appends when a run completes). Findings are log
events like any other, so they replay and resume by position the same way.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Protocol

from events import types as ev
from events.projections import DEFAULT_ORGANIZATION_ID, derive
from events.secrets import masked_event
from events.store import EventStore, StoreError, next_page
from events.wire import event_data

RUN_LEVEL = frozenset({"RunStarted", "TestPassed", "TestFailed", "RunCompleted", "RunCancelled"})
"""What a project's stream carries of its runs' events."""
TERMINAL = frozenset({"RunCompleted", "RunCancelled"})
PAGE = 1000
_KNOWN_RUNS = 20_000
_log = logging.getLogger("baton.service.realtime")


class Entry:
    """One recorded event, encoded once for every subscriber that is sent it."""

    __slots__ = ("_sse", "data", "event", "position", "project", "stream", "type", "version")

    def __init__(self, recorded: ev.RecordedEvent, project: uuid.UUID | None) -> None:
        self.position = recorded.position
        self.version = recorded.version
        self.stream = recorded.stream
        self.type = recorded.type
        self.event = masked_event(recorded.event)
        self.data = event_data(recorded.event)
        self.project = project
        """The project whose stream carries it: a run-level event's run's, a finding's
        (None for the others)."""
        self._sse: bytes | None = None

    @property
    def run_id(self) -> str:
        """The run it is about: its stream's, or for a finding the run that crossed a line."""
        if isinstance(self.event, ev.Finding):
            return self.event.run_id
        return self.stream.removeprefix("run-")

    def sse(self) -> bytes:
        """The event as a Server-Sent Events message (the same bytes for every subscriber)."""
        if self._sse is None:
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.position,
                self.type.encode(),
                self.data,
            )
        return self._sse


def project_of_findings(stream: str) -> uuid.UUID | None:
    """The project of an ``analytics-<project id>`` stream (None for another stream)."""
    if not stream.startswith(ev.ANALYTICS_PREFIX):
        return None
    try:
        return uuid.UUID(stream.removeprefix(ev.ANALYTICS_PREFIX))
    except ValueError:
        return None


def project_of(started: ev.RunStarted) -> uuid.UUID | None:
    """The id of a run's project: derived from its organization and name, as the projector
    and the projects API derive it, so the organization is part of it."""
    try:
        org = uuid.UUID(started.organization) if started.organization else DEFAULT_ORGANIZATION_ID
    except ValueError:
        return None  # not an organization the service knows
    return derive("project", org, started.project)


class Hub:
    """The feed of one app: see the module's docstring. Runs only while someone follows."""

    def __init__(self, store: EventStore, *, fallback: float = 1.0, keep: int = 5000):
        self._store = store
        self._fallback = fallback
        self._keep = keep
        self._entries: list[Entry] = []
        self._positions: list[int] = []
        self._base = 0
        self._head = 0
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._deserted = asyncio.Event()
        """Set when the last follower leaves: the tail ends."""
        self._followers = 0
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._projects: dict[str, uuid.UUID | None] = {}

    @property
    def head(self) -> int:
        """Every event up to this position has been read into the window."""
        return self._head

    @property
    def base(self) -> int:
        """The window holds every event after this position (up to ``head``)."""
        return self._base

    @property
    def store(self) -> EventStore:
        return self._store

    async def log_head(self) -> int:
        """The log's highest position now (where a stream "from now on" starts)."""
        # positions commit in order (the store's contract), so nothing can still commit
        # below the highest position there is
        return await self._store.head()

    @contextlib.contextmanager
    def waking(self, key: str, wake: asyncio.Event) -> Iterator[None]:
        """Within the block, ``wake`` is set whenever events of ``key`` (a stream, or
        ``project_key``) join the window: only the followers they concern are woken."""
        self._waiters.setdefault(key, set()).add(wake)
        try:
            yield
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[key]

    def since(self, position: int) -> Sequence[Entry]:
        """The events of the window after ``position`` (which must be >= ``base``)."""
        return self._entries[bisect.bisect_right(self._positions, position) :]

    async def attach(self) -> None:
        """Count a follower in; the first one starts the tail at the log's end."""
        self._followers += 1
        try:
            async with self._starting:
                if self._task is None:
                    head = await self.log_head()
                    self._entries, self._positions = [], []
                    self._base = self._head = max(head, self._head)
                    self._task = asyncio.create_task(self._tail(), name="baton-realtime")
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        self._followers -= 1
        if self._followers == 0:
            self._deserted.set()

    async def entries(self, records: Sequence[ev.RecordedEvent]) -> list[Entry]:
        """``records`` as entries, with the project of each run-level event's run and of
        each finding."""
        unknown = {
            r.stream
            for r in records
            if r.type in RUN_LEVEL and r.type != "RunStarted" and r.stream not in self._projects
        }
        if unknown:
            for stream, first in (await self._store.first_events(list(unknown))).items():
                started = first.event
                self._known(
                    stream, project_of(started) if isinstance(started, ev.RunStarted) else None
                )
        made = []
        for recorded in records:
            project = None
            if isinstance(recorded.event, ev.RunStarted):
                project = project_of(recorded.event)
                self._known(recorded.stream, project)
            elif recorded.type in RUN_LEVEL:
                project = self._projects.get(recorded.stream)
            elif isinstance(recorded.event, ev.Finding):
                project = project_of_findings(recorded.stream)
            made.append(Entry(recorded, project))
        return made

    def _known(self, stream: str, project: uuid.UUID | None) -> None:
        if len(self._projects) >= _KNOWN_RUNS:
            self._projects.clear()  # a cache: a forgotten run is looked up again
        self._projects[stream] = project

    async def _tail(self) -> None:
        try:
            while self._followers > 0:
                try:
                    await self._follow_log()
                except Exception as exc:  # followers wait on this task: it must go on
                    if isinstance(exc, StoreError):
                        _log.warning("realtime feed: %s; retrying", exc)
                    else:
                        _log.exception("realtime feed failed; retrying")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._deserted.wait(), self._fallback)
        finally:
            self._task = None  # before any await: a new follower starts a new tail

    async def _follow_log(self) -> None:
        """Read the log into the window as appends commit, until nobody follows. A page that
        fails on its way in is read again: the subscription starts over from ``head``."""
        self._deserted.clear()
        pages = self._store.subscribe(self._head, limit=PAGE, idle=self._fallback)
        async with contextlib.aclosing(pages):
            while (records := await next_page(pages, self._deserted)) is not None:
                if not records:
                    continue  # a heartbeat
                made = await self.entries(records)
                self._entries.extend(made)
                self._positions.extend(entry.position for entry in made)
                self._head = made[-1].position
                if len(self._entries) > 2 * self._keep:
                    cut = len(self._entries) - self._keep
                    self._base = self._positions[cut - 1]
                    del self._entries[:cut], self._positions[:cut]
                self._wake(made)

    def _wake(self, made: Sequence[Entry]) -> None:
        waiters = self._waiters
        keys = {entry.stream for entry in made}
        keys.update(project_key(entry.project) for entry in made if entry.project is not None)
        for key in keys:
            for wake in waiters.get(key, ()):
                wake.set()


def project_key(project: uuid.UUID) -> str:
    return f"project:{project}"


class Feed(Protocol):
    """What one subscriber follows."""

    async def catch_up(self, through: int) -> tuple[list[Entry], int]:
        """From the store: the wanted events after ``through``, and the position up to
        which nothing else is wanted (the next ``through``)."""
        ...

    def wanted(self, entry: Entry) -> bool: ...

    @property
    def key(self) -> str:
        """What wakes it (see ``Hub.waking``)."""
        ...


class RunFeed:
    """The events of one run's stream."""

    def __init__(self, hub: Hub, stream: str) -> None:
        self._hub = hub
        self._stream = stream

    async def catch_up(self, through: int) -> tuple[list[Entry], int]:
        head = self._hub.head  # read before the store: everything up to it is committed
        records = await self._hub.store.read_stream(self._stream, after_position=through)
        entries = [Entry(r, None) for r in records]
        return entries, max(head, entries[-1].position if entries else through)

    def wanted(self, entry: Entry) -> bool:
        return entry.stream == self._stream

    @property
    def key(self) -> str:
        return self._stream


class ProjectFeed:
    """The run-level events of the runs of one project, and its findings."""

    def __init__(self, hub: Hub, project: uuid.UUID) -> None:
        self._hub = hub
        self._project = project

    async def catch_up(self, through: int) -> tuple[list[Entry], int]:
        head = self._hub.head
        records = await self._hub.store.read_all(through, PAGE)
        entries = [e for e in await self._hub.entries(records) if self.wanted(e)]
        if len(records) == PAGE:
            return entries, records[-1].position
        return entries, max(head, records[-1].position if records else through)

    def wanted(self, entry: Entry) -> bool:
        return entry.project == self._project

    @property
    def key(self) -> str:
        return project_key(self._project)


async def follow(
    hub: Hub, feed: Feed, after: int, *, heartbeat: float = 15.0
) -> AsyncGenerator[list[Entry], None]:
    """Every event of ``feed`` after position ``after``, in batches, in order, each once;
    an empty batch when ``heartbeat`` seconds passed without one."""
    wake = asyncio.Event()
    await hub.attach()
    try:
        with hub.waking(feed.key, wake):
            through = after
            while True:
                wake.clear()  # before looking: what joins the window from now on wakes it
                if through < hub.base:
                    batch, through = await feed.catch_up(through)
                else:
                    batch = [entry for entry in hub.since(through) if feed.wanted(entry)]
                    through = max(through, hub.head)  # a cursor from elsewhere may be ahead
                if batch:
                    yield batch
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), heartbeat)
                except TimeoutError:
                    yield []
    finally:
        hub.detach()
