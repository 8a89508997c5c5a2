"""Test sessions: runs grouped over a period, with a state that says whether new runs may
start. The state is a fold of the session's stream (``session-<id>``); every change is
appended at the version it was decided on, so two changes decided at once never both land
(the loser reads again and decides again).

    created --run--> active --pause--> paused --resume--> active
    active --complete--> completed        active | paused --fail--> failed

Runs start in a created or active session (the first one makes it active); a paused,
completed or failed one refuses them with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from events import types as ev
from events.errors import SessionRefused, UnknownSession, WrongExpectedVersion
from events.store import EventStore, NewEvent, StreamAppend

SessionStatus = Literal["created", "active", "paused", "completed", "failed"]
Change = Literal["pause", "resume", "complete", "fail"]
RUNNABLE: frozenset[SessionStatus] = frozenset({"created", "active"})
_FROM: dict[Change, frozenset[SessionStatus]] = {
    "pause": frozenset({"active"}),
    "resume": frozenset({"paused"}),
    "complete": frozenset({"active"}),
    "fail": frozenset({"active", "paused"}),
}
_ONLY: dict[Change, str] = {
    "pause": "only an active session can be paused",
    "resume": "only a paused session can be resumed",
    "complete": "only an active session can be completed",
    "fail": "only an active or paused session can be failed",
}
_ATTEMPTS = 5
"""How often a change is decided again after another one landed first."""


@dataclass(frozen=True)
class Session:
    id: str
    name: str
    status: SessionStatus
    version: int
    created_at: datetime
    description: str = ""
    project: str = "default"
    organization: str = ""
    tester: str = ""
    started_at: datetime | None = None
    """When its first run started."""
    ended_at: datetime | None = None
    reason: str = ""
    """Why it was paused or failed."""
    run_ids: tuple[str, ...] = field(default=())


def fold(recorded: Sequence[ev.RecordedEvent]) -> Session | None:
    """The session its stream's events (in version order) describe; None without any."""
    session: Session | None = None
    for item in recorded:
        event = item.event
        if isinstance(event, ev.SessionCreated):
            session = Session(
                id=event.session_id,
                name=event.name,
                status="created",
                version=item.version,
                created_at=item.recorded_at,
                description=event.description,
                project=event.project,
                organization=event.organization,
                tester=event.tester,
            )
            continue
        if session is None:
            continue
        session = replace(session, version=item.version)
        if isinstance(event, ev.SessionRunsStarted):
            session = replace(
                session,
                status="active" if session.status == "created" else session.status,
                started_at=session.started_at or item.recorded_at,
                run_ids=(*session.run_ids, *event.run_ids),
            )
        elif isinstance(event, ev.SessionPaused):
            session = replace(session, status="paused", reason=event.reason)
        elif isinstance(event, ev.SessionResumed):
            session = replace(session, status="active", reason="")
        elif isinstance(event, ev.SessionCompleted):
            session = replace(session, status="completed", ended_at=item.recorded_at)
        elif isinstance(event, ev.SessionFailed):
            session = replace(
                session, status="failed", ended_at=item.recorded_at, reason=event.reason
            )
    return session


async def read(store: EventStore, session_id: str) -> Session:
    """Raises UnknownSession."""
    session = fold(await store.read_stream(ev.session_stream(session_id)))
    if session is None:
        raise UnknownSession(session_id)
    return session


async def create(
    store: EventStore,
    name: str,
    *,
    description: str = "",
    project: str = "default",
    organization: str = "",
    tester: str = "",
) -> Session:
    session_id = str(ev.new_id())
    event = ev.SessionCreated(
        session_id=session_id,
        name=name,
        description=description,
        project=project,
        organization=organization,
        tester=tester,
    )
    await store.append([StreamAppend(ev.session_stream(session_id), [NewEvent(event)], 0)])
    return await read(store, session_id)


def _refusal(session: Session, what: str) -> str:
    why = f" ({session.reason})" if session.reason else ""
    return f"test session {session.id} ({session.name}) is {session.status}{why}: {what}"


async def change(store: EventStore, session_id: str, to: Change, reason: str = "") -> Session:
    """Pause, resume, complete or fail the session. Raises UnknownSession, SessionRefused."""
    for _ in range(_ATTEMPTS):
        session = await read(store, session_id)
        if session.status not in _FROM[to]:
            raise SessionRefused(_refusal(session, _ONLY[to]))
        event = _event(to, reason)
        stream = ev.session_stream(session_id)
        try:
            await store.append([StreamAppend(stream, [NewEvent(event)], session.version)])
        except WrongExpectedVersion:
            continue  # another change landed first: decide again on what it left
        return await read(store, session_id)
    raise SessionRefused(f"test session {session_id} changes too often to {to} it now")


def _event(to: Change, reason: str) -> ev.SessionEvent:
    if to == "pause":
        return ev.SessionPaused(reason=reason)
    if to == "resume":
        return ev.SessionResumed()
    if to == "complete":
        return ev.SessionCompleted()
    return ev.SessionFailed(reason=reason)


async def admit(store: EventStore, session_id: str, run_ids: Sequence[str]) -> Session:
    """Record that these runs start in the session, if its state lets runs start. Raises
    UnknownSession, or SessionRefused naming the state and why (a paused session's
    reason)."""
    for _ in range(_ATTEMPTS):
        session = await read(store, session_id)
        if session.status not in RUNNABLE:
            raise SessionRefused(
                _refusal(session, "no new run starts in it")
                + (" (resume it first)" if session.status == "paused" else "")
            )
        event = ev.SessionRunsStarted(run_ids=list(run_ids))
        stream = ev.session_stream(session_id)
        try:
            await store.append([StreamAppend(stream, [NewEvent(event)], session.version)])
        except WrongExpectedVersion:
            continue  # another run joined, or the session changed: look again
        return await read(store, session_id)
    raise SessionRefused(f"test session {session_id} changes too often to start runs in it now")
