"""/api/v1/sessions: test sessions (events.sessions). A session's state is read from its
stream, so a pause is seen by the very next request; its runs come from the read tables.

Creating and changing a session needs the ``run`` scope; a paused, completed or failed
session refuses a change its state does not allow, and new runs (POST /api/v1/runs with
``session_id``), with 409 and the reason.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.params import FromPath, JSONBody

from context_service.api.common import Description, Name, PrincipalDep, ServicesDep
from context_service.errors import Conflict, NotFound
from context_service.keys import Principal
from context_service.services import Services
from events import sessions
from events.errors import SessionRefused, UnknownSession
from events.projections import DEFAULT_ORGANIZATION_ID

Reason = Annotated[str, msgspec.Meta(max_length=2000)]


class SessionCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    description: Description = ""
    project: Name = "default"
    """The project's name, as a flow's ``project``."""
    tester: Annotated[str, msgspec.Meta(max_length=200)] = ""


class SessionChange(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    reason: Reason = ""
    """Why it is paused or failed (shown in every refusal while it is)."""


class Session(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    description: str
    project: str
    tester: str
    status: str
    """created, active, paused, completed or failed."""
    reason: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    runs: int


class SessionRun(msgspec.Struct, frozen=True):
    run_id: uuid.UUID
    added_at: datetime
    status: str | None
    """The run's, once the read tables hold it (null until then)."""
    suite: str | None
    started_at: datetime | None
    ended_at: datetime | None


_RUNS = """
SELECT s.run_id, s.added_at, r.status, t.name, r.started_at, r.ended_at
FROM session_runs s
LEFT JOIN test_runs r ON r.id = s.run_id
LEFT JOIN test_suites t ON t.id = r.suite_id
WHERE s.session_id = $1
ORDER BY s.added_at, s.run_id
"""


def _shown(found: sessions.Session) -> Session:
    return Session(
        uuid.UUID(found.id),
        found.name,
        found.description,
        found.project,
        found.tester,
        found.status,
        found.reason,
        found.created_at,
        found.started_at,
        found.ended_at,
        len(found.run_ids),
    )


async def _read(
    services: Services, principal: Principal, session_id: uuid.UUID
) -> sessions.Session:
    """The session if the principal's organization has it, else NotFound."""
    try:
        found = await sessions.read(services.store, str(session_id))
    except UnknownSession:
        raise NotFound(f"no test session {session_id}") from None
    owner = found.organization or str(DEFAULT_ORGANIZATION_ID)
    if owner != str(principal.organization_id):
        raise NotFound(f"no test session {session_id}")
    return found


async def admit(
    services: Services, principal: Principal, session_id: uuid.UUID, run_id: str
) -> None:
    """Admit a run the service starts to the session: NotFound, or Conflict with the reason."""
    await _read(services, principal, session_id)
    try:
        await sessions.admit(services.store, str(session_id), [run_id])
    except SessionRefused as exc:
        raise Conflict(str(exc)) from None


class SessionController(Controller):
    path = "/api/v1/sessions"
    tags = ("sessions",)

    @post("/", opt={"scope": "run"})
    async def create_session(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[SessionCreate]
    ) -> Session:
        found = await sessions.create(
            services.store,
            data.name,
            description=data.description,
            project=data.project,
            organization=str(principal.organization_id),
            tester=data.tester,
        )
        return _shown(found)

    @get("/{session_id:uuid}")
    async def get_session(
        self, services: ServicesDep, principal: PrincipalDep, session_id: FromPath[uuid.UUID]
    ) -> Session:
        return _shown(await _read(services, principal, session_id))

    @get("/{session_id:uuid}/runs")
    async def session_runs(
        self, services: ServicesDep, principal: PrincipalDep, session_id: FromPath[uuid.UUID]
    ) -> list[SessionRun]:
        """The runs admitted to the session, oldest first, as the read tables hold them."""
        await _read(services, principal, session_id)
        async with services.db.tenant(principal.organization_id) as conn:
            rows = await conn.fetch(_RUNS, session_id)
        return [SessionRun(*row) for row in rows]

    async def _change(
        self,
        services: Services,
        principal: Principal,
        session_id: uuid.UUID,
        to: sessions.Change,
        reason: str = "",
    ) -> Session:
        await _read(services, principal, session_id)
        try:
            return _shown(await sessions.change(services.store, str(session_id), to, reason))
        except SessionRefused as exc:
            raise Conflict(str(exc)) from None

    @post("/{session_id:uuid}/pause", status_code=200, opt={"scope": "run"})
    async def pause_session(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        session_id: FromPath[uuid.UUID],
        data: JSONBody[SessionChange | None] = None,
    ) -> Session:
        """No new run starts in the session until it is resumed; runs in flight go on."""
        reason = data.reason if data is not None else ""
        return await self._change(services, principal, session_id, "pause", reason)

    @post("/{session_id:uuid}/resume", status_code=200, opt={"scope": "run"})
    async def resume_session(
        self, services: ServicesDep, principal: PrincipalDep, session_id: FromPath[uuid.UUID]
    ) -> Session:
        return await self._change(services, principal, session_id, "resume")

    @post("/{session_id:uuid}/complete", status_code=200, opt={"scope": "run"})
    async def complete_session(
        self, services: ServicesDep, principal: PrincipalDep, session_id: FromPath[uuid.UUID]
    ) -> Session:
        return await self._change(services, principal, session_id, "complete")

    @post("/{session_id:uuid}/fail", status_code=200, opt={"scope": "run"})
    async def fail_session(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        session_id: FromPath[uuid.UUID],
        data: JSONBody[SessionChange | None] = None,
    ) -> Session:
        reason = data.reason if data is not None else ""
        return await self._change(services, principal, session_id, "fail", reason)
